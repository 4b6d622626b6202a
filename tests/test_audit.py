"""LiveAudit: counts exactly the audited samples that exit with another answer than the MainNet's, on a
random share of the traffic; its bound is the guarantees' Clopper-Pearson bound; it is flagged only
once enough audits could clear it; it reads no device value while it counts; in PooledRouter it
changes no answer."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from helpers import make_images, threshold_between
from sidenet import AdaptiveModel
from sidenet.audit import LiveAudit
from sidenet.guarantee import upper_bound
from sidenet.serving import PooledRouter


def routed_at(model: AdaptiveModel, images: torch.Tensor, quantile: float) -> AdaptiveModel:
    with torch.no_grad():
        model.threshold = threshold_between(model.front_pass(images, "side").confidence, quantile)
    return model.eval()


@torch.no_grad()
def disagreements(model: AdaptiveModel, images: torch.Tensor) -> int:
    """Samples that exit with another answer than the MainNet's, counted directly."""
    front = model.front_pass(images, "adaptive")
    main = model(images, mode="main").logits.argmax(dim=-1)
    return int(((front.side_logits.argmax(dim=-1) != main) & front.exited).sum())


def test_auditing_every_sample_counts_every_disagreeing_exit(tiny_model: AdaptiveModel) -> None:
    images = make_images(96, seed=1)
    model = routed_at(tiny_model, images, 0.4)
    audit = LiveAudit(share=1.0, tolerance=0.1)
    for batch in images.split(32):
        audit.check(model, model.front_pass(batch, "adaptive"))
    expected = disagreements(model, images)
    assert 0 < expected < 96
    assert (audit.samples_seen, audit.audited, audit.disagreed) == (96, 96, expected)
    assert audit.rate() == expected / 96
    assert audit.upper_bound() == upper_bound(expected, 96, 0.05)


def test_a_share_draws_about_that_share_and_counts_only_drawn_samples(tiny_model: AdaptiveModel) -> None:
    images = make_images(2000, seed=2)
    model = routed_at(tiny_model, images, 0.0)  # everyone exits: a drawn sample disagrees or not
    audit = LiveAudit(share=0.1, tolerance=0.1, seed=3)
    for batch in images.split(100):
        audit.check(model, model.front_pass(batch, "adaptive"))
    # Binomial(2000, 0.1): mean 200, sd 13.4; 6 sd either side.
    assert audit.samples_seen == 2000 and 120 <= audit.audited <= 280
    assert 0 < audit.disagreed <= min(audit.audited, disagreements(model, images))


def test_state_collecting_ok_and_flagged(tiny_model: AdaptiveModel) -> None:
    images = make_images(256, seed=4)
    agreeing = LiveAudit(share=1.0, tolerance=0.1)
    assert agreeing.min_audits == math.ceil(math.log(0.05) / math.log(0.9)) == 29
    model = routed_at(tiny_model, images, 1.0)  # nobody exits: no disagreement possible
    agreeing.check(model, model.front_pass(images[:20], "adaptive"))
    assert agreeing.state == "collecting" and not agreeing.flagged and agreeing.upper_bound() > 0.1
    agreeing.check(model, model.front_pass(images[20:], "adaptive"))
    assert agreeing.state == "ok" and agreeing.disagreed == 0 and agreeing.upper_bound() < 0.1
    model = routed_at(tiny_model, images, 0.0)  # everyone exits: the random SideNet disagrees often
    disagreeing = LiveAudit(share=1.0, tolerance=0.1)
    disagreeing.check(model, model.front_pass(images, "adaptive"))
    assert disagreeing.flagged and disagreeing.to_dict()["state"] == "flagged"
    assert disagreeing.to_dict()["upper_bound"] == upper_bound(disagreements(model, images), 256, 0.05)


def test_counting_reads_no_device_value(tiny_model: AdaptiveModel, monkeypatch: pytest.MonkeyPatch) -> None:
    images = make_images(64, seed=5)
    model = routed_at(tiny_model, images, 0.5)
    fronts = [model.front_pass(batch, "adaptive") for batch in images.split(16)]
    audit = LiveAudit(share=0.5, tolerance=0.1)
    reads: list[str] = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *args: object, _name: str = name, _original=original, **kwargs: object) -> object:
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for front in fronts:
        audit.check(model, front)
    assert reads == []
    monkeypatch.undo()
    assert audit.to_dict()["audited"] == audit.audited > 0


def test_counts_survive_pickling_and_add_up() -> None:
    audit = LiveAudit.from_counts(1000, 500, 3, share=0.5, tolerance=0.05)
    copy = pickle.loads(pickle.dumps(audit))
    assert copy.to_dict() == audit.to_dict()
    copy.add_counts(100, 50, 1)
    assert (copy.samples_seen, copy.audited, copy.disagreed) == (1100, 550, 4)
    with pytest.raises(ValueError, match="disagreed <= audited"):
        copy.add_counts(10, 5, 6)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"share": 0.0}, "share"), ({"share": 1.5}, "share"), ({"tolerance": 1.0}, "tolerance"), ({"delta": 0}, "delta")],
)
def test_bad_settings_raise(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LiveAudit(**options)


def test_in_a_pooled_router_the_audit_changes_no_answer(tiny_model: AdaptiveModel) -> None:
    images = make_images(120, seed=6)
    model = routed_at(tiny_model, images, 0.5)
    batches = list(images.split(12))
    plain = PooledRouter(model, rest_batch=16, max_wait=3).run(batches)
    audit = LiveAudit(share=1.0, tolerance=0.1)
    audited = PooledRouter(model, rest_batch=16, max_wait=3, audit=audit).run(batches)
    for a, b in zip(plain, audited, strict=True):
        assert a.batch_id == b.batch_id
        torch.testing.assert_close(a.output.logits, b.output.logits, rtol=0, atol=0)
        assert torch.equal(a.output.exited, b.output.exited) and torch.equal(a.output.flops, b.output.flops)
    assert audit.samples_seen == audit.audited == 120
    assert audit.disagreed == disagreements(model, images)


def test_text_batches_are_audited_like_images() -> None:
    from helpers import tiny_bert
    from sidenet import attach

    model = attach(tiny_bert(), 1, hidden=16, seed=0)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 14, (40,), generator=generator)
    mask = (torch.arange(14)[None] < lengths[:, None]).long()
    batch = {"input_ids": torch.randint(1, 50, (40, 14), generator=generator) * mask, "attention_mask": mask}
    model = routed_at(model, batch, 0.3)
    audit = LiveAudit(share=1.0, tolerance=0.2)
    audit.check(model, model.front_pass(batch, "adaptive"))
    assert audit.audited == 40 and audit.disagreed == disagreements(model, batch)


def test_logged_counts_are_summed_and_checked(tmp_path) -> None:
    from sidenet.audit import audit_from_log

    settings = {"share": 0.01, "tolerance": 0.05, "delta": 0.05}
    records = [
        {**settings, "samples_seen": 5_000, "audited": 50, "disagreed": 1},
        {"requests": 7, "audit": {**settings, "samples_seen": 3_000, "audited": 30, "disagreed": 2}},
    ]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(records))
    as_lines = tmp_path / "lines.jsonl"
    as_lines.write_text("\n".join(json.dumps(r) for r in records))
    for path in (as_list, as_lines):
        audit = audit_from_log(path)
        assert (audit.samples_seen, audit.audited, audit.disagreed) == (8_000, 80, 3)
        assert audit.tolerance == 0.05 and audit.upper_bound() == pytest.approx(upper_bound(3, 80, 0.05))
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([records[0], {**records[0], "tolerance": 0.01}]))
    with pytest.raises(ValueError, match="different settings"):
        audit_from_log(mixed)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"requests": 3, "audit": None}))
    with pytest.raises(ValueError, match="no audit counts"):
        audit_from_log(empty)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="neither JSON nor JSON lines"):
        audit_from_log(garbage)
