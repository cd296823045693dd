# ccproxy: every target runs from a clean clone; tools are installed into .cache/ when missing.
PYTHON ?= python3
CACHE  := $(CURDIR)/.cache
PYDEPS := $(CACHE)/py
PREFIX ?= /usr/local
UNIT_DIR ?= /etc/systemd/system
export PYTHONPATH := $(PYDEPS)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: test test-versions e2e bench ab bench-tools lint fuzz soak check-unit check-metrics install uninstall clean

test:  ## run the test suite (installs pytest into .cache/py if it is missing)
	@$(PYTHON) -c 'import pytest' 2>/dev/null || \
	  $(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(PYDEPS) pytest
	$(PYTHON) -m pytest -q test_ccproxy.py

PYTHONS ?= 3.9 3.13
test-versions:  ## the suite under -X dev on the oldest and newest CPython here (pyenv), unclosed resources failing it
	@for v in $(PYTHONS); do \
	  py=$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v.*/bin/python3 2>/dev/null | sort -V | tail -1); \
	  [ -n "$$py" ] || { python$$v -c pass 2>/dev/null && py=python$$v; }; \
	  if [ -z "$$py" ]; then echo "SKIP python$$v: not installed"; continue; fi; \
	  echo "== $$($$py --version) -X dev -W error::ResourceWarning -m unittest test_ccproxy"; \
	  $$py -X dev -W error::ResourceWarning -m unittest test_ccproxy 2> .cache-test-$$v.log; rc=$$?; \
	  grep -A30 "^FAIL:\|^ERROR:" .cache-test-$$v.log | head -80; tail -3 .cache-test-$$v.log; \
	  if grep -q "ResourceWarning" .cache-test-$$v.log; then rc=1; \
	    grep -B2 -A6 "ResourceWarning" .cache-test-$$v.log | head -40; echo "FAIL unclosed resources"; fi; \
	  rm -f .cache-test-$$v.log; [ $$rc = 0 ] || exit 1; done

e2e:  ## real clients (Claude Code CLI, anthropic SDK, README curl, nginx in front) through ccproxy
	$(PYTHON) e2e/run.py

bench: bench-tools  ## ccproxy against direct calls to the same fake upstream (PEERS=litellm adds LiteLLM)
	$(PYTHON) bench/bench.py $(if $(PEERS),--peers $(PEERS))

ab: bench-tools  ## two builds side by side in one run: make ab A=HEAD~1 [B=rev or file]
	$(PYTHON) bench/ab.py $(or $(A),HEAD~1) $(B)

bench-tools:  # nginx (the fake upstream) and wrk, from Debian's packages when root
	@command -v nginx >/dev/null && command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && \
	  command -v apt-get >/dev/null && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq nginx-light wrk >/dev/null 2>&1; }; } || true

fuzz:  ## the seeded fuzz tests with many more iterations (FUZZ=200000 for longer)
	@$(PYTHON) -c 'import pytest' 2>/dev/null || \
	  $(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(PYDEPS) pytest
	CCPROXY_FUZZ_ITERATIONS=$${FUZZ:-30000} $(PYTHON) -m pytest -q test_ccproxy.py -k Fuzz

soak:  ## a few hundred streaming clients for a minute through 2 workers: a reload, a worker killed, a restart
	ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn); \
	$(PYTHON) bench/soak.py --clients $${CLIENTS:-300} --seconds $${SECONDS_:-60}

lint:  ## compile, check the 3.9 floor with vermin, print the file's shape
	$(PYTHON) -m py_compile ccproxy.py test_ccproxy.py
	@$(PYTHON) -c 'import vermin' 2>/dev/null || \
	  $(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(PYDEPS) vermin
	$(PYTHON) -c 'import sys; from vermin.main import main; sys.exit(main())' --no-tips -t=3.9- --violations ccproxy.py
	@$(PYTHON) -c 'import ast,statistics,sys; t=ast.parse(open("ccproxy.py").read()); \
	  n=sorted(f.end_lineno-f.lineno+1 for f in ast.walk(t) if isinstance(f,ast.FunctionDef)); \
	  print("functions: %d, median %s lines, max %d" % (len(n), statistics.median(n), n[-1])); \
	  sys.exit(n[-1] > 60)'

check-unit:  ## systemd-analyze verify (stderr must be empty) and security (exposure <= 2.0)
	@command -v systemd-analyze >/dev/null || { echo "SKIP check-unit: systemd-analyze not installed"; exit 0; }; \
	tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	sed "s|/usr/local/bin/ccproxy|$(CURDIR)/ccproxy.py|" ccproxy.service > $$tmp/ccproxy.service; \
	systemd-analyze verify $$tmp/ccproxy.service 2>$$tmp/err; rc=$$?; cat $$tmp/err; \
	if [ $$rc -ne 0 ] || [ -s $$tmp/err ]; then echo "FAIL systemd-analyze verify"; exit 1; fi; \
	systemd-analyze security --offline=true --threshold=20 $$tmp/ccproxy.service > $$tmp/sec 2>&1; rc=$$?; \
	tail -1 $$tmp/sec; if [ $$rc -ne 0 ]; then echo "FAIL exposure above 2.0"; exit 1; fi; \
	echo "OK check-unit"

check-metrics:  ## promtool check metrics on a live scrape after some traffic (installs promtool)
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }; } || true
	@command -v promtool >/dev/null || { echo "SKIP check-metrics: promtool not installed (Debian package prometheus)"; exit 0; }; \
	$(PYTHON) -c 'import test_ccproxy as t; t.print_live_scrape()' > .cache-scrape.txt && \
	promtool check metrics < .cache-scrape.txt; rc=$$?; \
	echo "$$(grep -c -v '^#' .cache-scrape.txt) samples checked"; rm -f .cache-scrape.txt; \
	if [ $$rc -ne 0 ]; then echo "FAIL promtool check metrics"; exit 1; fi; echo "OK check-metrics"

install:  ## ccproxy.py (build stamped, bytecode precompiled) in $(PREFIX)/lib/ccproxy, bin/ccproxy, the unit
	@commit=$$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown); \
	date=$$(git log -1 --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo unknown); \
	lib=$(DESTDIR)$(PREFIX)/lib/ccproxy; install -d $$lib $(DESTDIR)$(PREFIX)/bin; \
	sed -e "s|^BUILD_COMMIT = None|BUILD_COMMIT = \"$$commit\"|" \
	    -e "s|^BUILD_DATE = None|BUILD_DATE = \"$$date\"|" ccproxy.py > $$lib/ccproxy.py; \
	chmod 755 $$lib/ccproxy.py; $(PYTHON) -m py_compile $$lib/ccproxy.py; \
	ln -sf ../lib/ccproxy/ccproxy.py $(DESTDIR)$(PREFIX)/bin/ccproxy; \
	install -d $(DESTDIR)$(UNIT_DIR); \
	sed "s|/usr/local/bin/ccproxy|$(PREFIX)/bin/ccproxy|" ccproxy.service > $(DESTDIR)$(UNIT_DIR)/ccproxy.service; \
	chmod 644 $(DESTDIR)$(UNIT_DIR)/ccproxy.service; \
	echo "installed $$lib/ccproxy.py (commit $$commit), $(DESTDIR)$(PREFIX)/bin/ccproxy and $(DESTDIR)$(UNIT_DIR)/ccproxy.service"

uninstall:
	rm -rf $(DESTDIR)$(PREFIX)/lib/ccproxy
	rm -f $(DESTDIR)$(PREFIX)/bin/ccproxy $(DESTDIR)$(UNIT_DIR)/ccproxy.service

clean:
	rm -rf .cache .pytest_cache __pycache__
