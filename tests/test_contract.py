"""models/contract.py: the tensor contract named once, in one order, without torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from models import contract
from models.spec import MODALITIES


def test_inputs_are_grouped_in_modality_order():
    order = [MODALITIES.index(i.modality) for i in contract.INPUTS]
    assert order == sorted(order)
    assert len(contract.BY_NAME) == len(contract.INPUTS)  # names are unique


def test_input_names_follow_the_contract_order_whatever_the_given_order():
    assert contract.input_names(["audio", "text"]) == ["input_ids", "attention_mask", *contract.inputs_of("audio")]
    assert contract.input_names(["image"]) == ["pixel_values", "image_present"]
    assert contract.input_names(list(reversed(MODALITIES))) == [i.name for i in contract.INPUTS]


def test_axes_and_presence():
    assert contract.dynamic_axes("input_ids") == {0: "batch", 1: "sequence"}
    assert contract.dynamic_axes("pixel_values") == {0: "batch"}
    assert contract.output_axes("ner") == {0: "batch", 1: "sequence"} and contract.output_axes("vqa") == {0: "batch"}
    assert contract.PRESENCE == {"image": "image_present", "audio": "audio_present"}


def test_contract_preprocessing_and_validate_import_no_torch():
    code = ("import sys, models.contract, models.preprocessing, models.manifest, training.parity, training.validate; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).parents[1]))
