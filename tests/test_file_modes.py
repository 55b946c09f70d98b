"""What the tools write gets the permissions of the user's umask (not tempfile's private 0600 / 0700)."""
import os

import pytest
import torch

from megatron_qvgen.convert.atomic_folder import new_folder
from megatron_qvgen.convert.errors import ConversionError
from qvgen_kernels.format import QuantizationConfig, existing_export_files, write_export


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_export_files_follow_the_umask(tmp_path, umask_022):
    config = QuantizationConfig(weight_bits=4, act_bits=4, act_clip_ratio=0.95, num_timestep_groups=1)
    dst = write_export(tmp_path / "export", {"_class_name": "WanTransformer3DModel"}, config, {},
                       {"proj_out.bias": torch.zeros(3)})
    assert sorted((f.name, oct(f.stat().st_mode & 0o777)) for f in dst.iterdir()) == [
        ("config.json", "0o644"), ("model.safetensors", "0o644"), ("quantization_config.json", "0o644")]
    assert existing_export_files(dst) == ("model.safetensors", "config.json", "quantization_config.json")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_export(dst, {}, config, {}, {})


def test_converted_folders_follow_the_umask_and_appear_whole(tmp_path, umask_022):
    with new_folder(tmp_path / "ckpt") as tmp:
        (tmp / "a.bin").write_bytes(b"x")
        os.chmod(tmp / "a.bin", 0o600)   # as safetensors writes it
        assert not (tmp_path / "ckpt").exists()
    assert oct((tmp_path / "ckpt").stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / "ckpt" / "a.bin").stat().st_mode & 0o777) == "0o644"
    with pytest.raises(ConversionError, match="already exists"):
        with new_folder(tmp_path / "ckpt"):
            pass
    with pytest.raises(RuntimeError):
        with new_folder(tmp_path / "failed"):
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]   # the temporary sibling is gone


def test_the_umask_is_read_without_being_changed(tmp_path):
    from qvgen_kernels.format import chmod_per_umask, current_umask

    old = os.umask(0o007)
    try:
        assert current_umask() == 0o007 and current_umask() == 0o007
        private = tmp_path / "f"
        private.write_bytes(b"")
        os.chmod(private, 0o600)
        chmod_per_umask(private)
        assert oct(private.stat().st_mode & 0o777) == "0o660"
    finally:
        os.umask(old)
