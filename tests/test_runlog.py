"""Run-directory helpers: checkpoints that cannot be read are refused by name, never half-read."""
import pytest
import torch

from beitfast.runlog import atomic_save, read_checkpoint


class Payload:  # any class outside torch's weights-only allow-list
    pass


def test_read_checkpoint(tmp_path):
    good = tmp_path / "good.pt"
    atomic_save({"format": "f1", "w": torch.ones(2)}, good)
    assert torch.equal(read_checkpoint(good, "f1", "fix")["w"], torch.ones(2))
    with pytest.raises(ValueError, match=r"good.pt is not a checkpoint of this version \(format f2\); fix"):
        read_checkpoint(good, "f2", "fix")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"cannot read the checkpoint .*junk.pt .*; move it"):
        read_checkpoint(junk, "f1", "move it")
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "f1", "x": Payload()}, foreign)
    with pytest.raises(ValueError, match="cannot read the checkpoint"):
        read_checkpoint(foreign, "f1", "fix")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this version"):
        read_checkpoint(tmp_path / "list.pt", "f1", "fix")
    assert junk.read_bytes() == b"\x00garbage"
