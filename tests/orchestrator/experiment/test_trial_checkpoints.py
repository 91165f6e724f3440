from pathlib import Path

import torch

from orchestrator.experiment.checkpoints import load_states, newest_checkpoints


def test_a_resumed_trial_finds_the_newest_whole_checkpoint_even_when_its_tag_names_a_replaced_one(
        tmp_path: Path) -> None:
    """The worker died after Tune kept checkpoint 2 (and removed 0, which the tag still names) while checkpoint 3
    was half written: the resume continues from 2."""
    for index, epoch in [(1, 2), (2, 3), (3, 4)]:
        folder = tmp_path / f"checkpoint_{index:06d}"
        folder.mkdir()
        for seed in (0, 1):
            torch.save({"epoch": epoch, "seed": seed}, folder / f"seed-{seed}.pt")
    (tmp_path / "checkpoint_000001" / "seed-1.pt").unlink()  # a seed missing: not this one either
    whole = (tmp_path / "checkpoint_000003" / "seed-1.pt").read_bytes()
    (tmp_path / "checkpoint_000003" / "seed-1.pt").write_bytes(whole[: len(whole) // 2])
    folders = newest_checkpoints(tmp_path)
    assert [f.name for f in folders] == ["checkpoint_000003", "checkpoint_000002", "checkpoint_000001"]
    found = next(states for f in folders if (states := load_states(f, ["seed-0", "seed-1"])) is not None)
    assert found == {"seed-0": {"epoch": 3, "seed": 0}, "seed-1": {"epoch": 3, "seed": 1}}
    assert newest_checkpoints(None) == [] and newest_checkpoints(tmp_path / "gone") == []
