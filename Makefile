# The two commands of the README:
#   make demo   set up, then train and serve the quickstart on this machine (no cluster)
#   make test   set up (venv, kubectl/helm, control plane), then run every test tier, the server suite a
#               second time on the compiled request path the server image ships (KILN_TEST_COMPILED=1,
#               tests/support/compiled.py); the e2e tier last,
#               on a real node (scripts/images.sh + scripts/cluster.sh, started and stopped by the tier;
#               --timeout 2400 because its first test also waits for a cold image build and cluster start)
.PHONY: demo test unit live compiled e2e lint crds

PYTEST = .venv/bin/pytest

demo:
	bash scripts/setup.sh
	.venv/bin/kiln run examples/quickstart/digits.yaml --once --min-accuracy 0.95

test:
	bash scripts/setup.sh --test
	.venv/bin/ruff check .
	.venv/bin/lint-imports
	.venv/bin/mypy --strict kiln operator/kiln_operator images/server/kiln_server images/server/build_compiled.py images/trainer/kiln_trainer
	$(PYTEST) -q -p no:cacheprovider -m "not e2e"
	KILN_TEST_COMPILED=1 $(PYTEST) -q -p no:cacheprovider tests/server
	$(PYTEST) -q -p no:cacheprovider -m e2e --timeout 2400

# One tier at a time while developing.
unit:
	$(PYTEST) -q -m unit
live:
	$(PYTEST) -q -m live
compiled:
	KILN_TEST_COMPILED=1 $(PYTEST) -q tests/server
e2e:
	$(PYTEST) -q -m e2e --timeout 2400

lint:
	.venv/bin/ruff check .
	.venv/bin/lint-imports
	.venv/bin/mypy --strict kiln operator/kiln_operator images/server/kiln_server images/server/build_compiled.py images/trainer/kiln_trainer

crds:
	.venv/bin/python scripts/gen_crds.py
