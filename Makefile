# The two commands of the README:
#   make demo   set up, then train and serve the quickstart on this machine (no cluster)
#   make test   set up (venv, kubectl/helm, control plane), then run every test tier
.PHONY: demo test unit live lint crds

PYTEST = .venv/bin/pytest

demo:
	bash scripts/setup.sh
	.venv/bin/kiln run examples/quickstart/digits.yaml --once --min-accuracy 0.95

test:
	bash scripts/setup.sh --test
	$(PYTEST) -q -p no:cacheprovider

# One tier at a time while developing.
unit:
	$(PYTEST) -q -m unit
live:
	$(PYTEST) -q -m live

lint:
	.venv/bin/ruff check .

crds:
	.venv/bin/python scripts/gen_crds.py
