"""``cbtool families``: the support matrix, and the README's copy of it."""

from __future__ import annotations

import json
import re

from cbtool.cli.app import app
from cbtool.families import REGISTRY, support_matrix
from conftest import REPO_ROOT
from typer.testing import CliRunner


def test_families_lists_every_registered_class():
    result = CliRunner().invoke(app, ["families", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    listed = {name for row in rows for name in row["classes"]}
    assert listed == {name.rsplit(".", 1)[-1] for name in REGISTRY}
    assert {"VisionTransformer", "SwinTransformerV2", "Cait", "NaFlexVit", "CLIPModel", "SiglipVisionModel",
            "SwinForImageClassification", "BeitModel", "Dinov2WithRegistersModel", "DINOv3ViTModel", "Swinv2Model",
            "Data2VecVisionForImageClassification", "ViTMAEModel", "ViTMSNModel", "IJepaModel", "Dinov2Backbone",
            "SwinBackbone", "CLIPVisionModelWithProjection", "VisionTransformerRelPos", "VisionTransformerSAM",
            "SwinTransformerV2Cr"} <= listed
    assert all(row["cb"] and row["density"] for row in rows)


def test_readme_carries_the_same_table():
    readme = (REPO_ROOT / "README.md").read_text()
    table = re.search(r"<!-- families:.*?-->\n(.*?)<!-- /families -->", readme, re.S).group(1)
    result = CliRunner().invoke(app, ["families", "--markdown"])
    assert result.exit_code == 0
    assert table == result.output
    assert len(table.strip().splitlines()) == len(support_matrix()) + 2
