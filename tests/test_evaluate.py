"""Metrics of evaluate.py on hand-made inputs."""

import pytest
import torch

from evaluate import normalize_answer, question_type, recall_at_k, vqa_accuracy


def test_vqa_accuracy_normalises_answers():
    assert normalize_answer("  The Red!") == "red"
    assert vqa_accuracy(["Red.", "a circle", "no"], ["red", "circle", "yes"]) == 2 / 3
    assert question_type("What color is the shape?") == "color"
    assert question_type("What is the blue shape?") == "shape"
    assert question_type("Is there a circle?") == "yes/no"


def test_recall_at_k_on_a_hand_made_ranking():
    sim = torch.tensor([[0.9, 0.1, 0.5],  # query 0: ranking 0, 2, 1
                        [0.2, 0.3, 0.8],  # query 1: ranking 2, 1, 0
                        [0.4, 0.6, 0.5]])  # query 2: ranking 1, 2, 0
    relevant = torch.tensor([[True, False, False], [True, False, False], [False, False, True]])
    r = recall_at_k(sim, relevant, ks=(1, 2, 3))
    assert r == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
