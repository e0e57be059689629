"""Pure pieces of the TrainingJob controller: spec-edit detection and Kopf's bookkeeping being off."""

from __future__ import annotations

import kopf
import pytest
import yaml
from kiln_operator.main import NoDiffBase, build_registry, has_change_handlers
from kiln_operator.settings import OperatorSettings
from kiln_operator.trainingjob.controller import changed_fields, recorded_spec, slim_job

pytestmark = [pytest.mark.unit]


def test_changed_fields_names_each_edited_leaf() -> None:
    old = {"training": {"epochs": 3, "batchSize": 32}, "runPolicy": {"suspend": False}, "image": "a"}
    new = {"training": {"epochs": 5, "batchSize": 32}, "runPolicy": {"suspend": True}, "env": [{"name": "X"}]}
    assert changed_fields(old, new) == ["spec.env", "spec.image", "spec.runPolicy.suspend", "spec.training.epochs"]
    assert changed_fields(old, old) == []


def test_the_job_records_the_spec_it_was_made_from() -> None:
    spec = {"training": {"epochs": 3, "learningRate": 1e-5}}
    document = yaml.safe_dump({"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "spec": spec})
    body = {"metadata": {"name": "j", "uid": "u"}, "spec": {"template": {"metadata": {"annotations": {"kiln.dev/spec": document}}}}}
    assert recorded_spec(slim_job(body)) == spec
    assert recorded_spec(slim_job({"metadata": {"name": "old"}, "spec": {}})) is None, "Jobs made before the annotation"


def test_kiln_registers_no_change_handlers_so_no_diff_base_is_built() -> None:
    registry = build_registry(OperatorSettings())
    assert not has_change_handlers(registry)
    body = kopf.Body({"metadata": {"name": "x", "annotations": {"a": "b"}}, "spec": {"big": list(range(100))}})
    assert NoDiffBase(prefix="kiln.dev").build(body=body) == {}

    @kopf.on.update("kiln.dev", "v1alpha1", "trainingjobs", registry=registry)
    def changed(**_: object) -> None:
        pass

    assert has_change_handlers(registry), "a change handler would switch the real diff base back on"
