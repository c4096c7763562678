# Two entry points for a fresh machine: `make quickstart` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
DATA   ?= data/shakespeare
RUN    ?= runs/quickstart

.PHONY: quickstart test install install-dev lint bench repro-tiny repro-recipes clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

quickstart: install
	$(VENV)/bin/megapatch prep --sample shakespeare --out $(DATA) --skip-existing
	$(VENV)/bin/megapatch train configs/tiny.yaml data.path=$(DATA) run.dir=$(RUN) train.resume=auto
	$(VENV)/bin/megapatch summary $(RUN)

test: install-dev
	$(PY) -m ruff check megapatch data_prep tests bench launch
	# DeepSpeed JIT-builds a CPU op (shared-memory collectives) once per cache; a cache shared
	# with another Python, or built by another ninja (the venv's vs the system's: launch tests
	# put the venv first on PATH), is rebuilt at the next start, about a minute each time while
	# every other start waits: one cache, one ninja, built once before the tests.
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VENV)/torch_extensions \
		$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	# Two xdist workers: most tests run one process at a time, which leaves a core idle; tests
	# that share an expensive fixture stay on one worker (tests/conftest.py, ONE_WORKER_GROUPS)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VENV)/torch_extensions \
		$(PY) -m pytest -q -n 2 --dist loadgroup

lint: install-dev
	$(PY) -m ruff check megapatch data_prep tests bench launch
	$(PY) -m ruff format --check megapatch data_prep tests bench launch

bench: install-dev
	$(PY) bench/data.py
	$(PY) bench/ops.py
	$(PY) bench/train.py

repro-tiny: install-dev
	$(VENV)/bin/megapatch prep --sample shakespeare --out $(DATA) --skip-existing
	# one thread per run: the tiny model gains nothing from more, and the pairs share the cores
	OMP_NUM_THREADS=1 $(PY) bench/repro_tiny.py --data $(DATA) --out runs/repro-tiny

# patch recipes beyond the paper's at equal compute (docs/results.md); ~30 min on 2 cores
repro-recipes: install-dev
	$(VENV)/bin/megapatch prep --sample shakespeare --out $(DATA) --skip-existing
	OMP_NUM_THREADS=1 $(PY) bench/repro_recipes.py --data $(DATA) --out runs/repro-recipes

clean:
	rm -rf $(VENV) runs bench/results .pytest_cache
