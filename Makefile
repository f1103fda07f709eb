# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create (or refresh) the virtual environment. torch is installed first and
# pinned, so nothing later can pull a multi-GB CUDA build onto a CPU machine.
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.bigtrain-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,deepspeed,wandb]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	test -f data/stdlib/manifest.json || $(VENV)/bin/bigtrain prepare --source stdlib --tokenizer bytes --out data/stdlib
	$(VENV)/bin/bigtrain train configs/smoke.yaml
	@echo "TensorBoard logs: runs/smoke/tb   (view: $(VENV)/bin/tensorboard --logdir runs/smoke/tb)"

# PYTEST_ARGS narrows the run, e.g. make test PYTEST_ARGS='-m "not slow"' (the fast subset).
test: install
	scripts/ensure-slurm.sh
	@start=$$(date +%s); OMP_NUM_THREADS=1 $(PY) -m pytest -rs $(PYTEST_ARGS) tests; status=$$?; \
	echo "make test: suite wall time $$(( $$(date +%s) - start )) s, pytest exit status $$status"; exit $$status

bench: install
	for b in bench/*.py; do $(PY) $$b; done

clean:
	rm -rf $(VENV) runs data .pytest_cache
