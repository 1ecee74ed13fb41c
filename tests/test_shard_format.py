"""Naming a shard set: folders, manifests and brace patterns, and the one-line errors when they do not hold."""

from __future__ import annotations

import json

import pytest

from vlpretrain.data.shard_format import is_shard_spec, resolve_shards

from helpers import write_test_shards


def test_a_folder_a_manifest_and_a_pattern_name_the_same_shards(tmp_path):
    write_test_shards(tmp_path / "s", [3, 2, 4], manifest=True)
    by_folder = resolve_shards(tmp_path / "s")
    assert [s.samples for s in by_folder] == [3, 2, 4]
    assert resolve_shards(tmp_path / "s" / "manifest.json", verify=True) == by_folder
    pattern = str(tmp_path / "s" / "{00000..00002}.tar")
    assert [s.path for s in resolve_shards(pattern)] == [s.path for s in by_folder]
    assert is_shard_spec(pattern) and is_shard_spec(tmp_path / "s") and not is_shard_spec(tmp_path / "pairs.csv")


def test_bad_shard_specs_are_one_line_errors(tmp_path):
    write_test_shards(tmp_path / "s", [3, 2, 4], manifest=True)
    pattern = str(tmp_path / "s" / "{00010..00012}.tar")
    with pytest.raises(FileNotFoundError) as error:
        resolve_shards(pattern)
    assert str(error.value) == (f"{pattern}: the pattern matches no shard (expanded to 3 names, e.g. "
                                f"{tmp_path / 's' / '00010.tar'}); check the folder and the brace range")

    partly = str(tmp_path / "s" / "{00001..00004}.tar")
    with pytest.raises(FileNotFoundError, match=r"00003.tar: no such shard \(2 of the 4 shards the pattern"):
        resolve_shards(partly)

    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "00001.tar").rename(tmp_path / "s" / "moved.tar")
    with pytest.raises(FileNotFoundError) as error:
        resolve_shards(tmp_path / "s")
    assert str(error.value) == (f"{tmp_path / 's' / '00001.tar'}: listed in {tmp_path / 's' / 'manifest.json'} but "
                                f"missing; rerun `vlp data shard` with the same arguments to write it again")
    (tmp_path / "s" / "moved.tar").rename(tmp_path / "s" / "00001.tar")

    tar = tmp_path / "s" / "00002.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes: only the checksum can tell
    tar.write_bytes(bytes(data))
    resolve_shards(tmp_path / "s")  # sizes are always checked; checksums on request
    with pytest.raises(ValueError) as error:
        resolve_shards(tmp_path / "s", verify=True)
    assert str(error.value) == (f"{tar}: SHA-256 does not match {tmp_path / 's' / 'manifest.json'}: the shard is "
                                f"corrupt or was changed; write it again with `vlp data shard`")

    tar.write_bytes(bytes(data[:-512]))
    with pytest.raises(ValueError) as error:
        resolve_shards(tmp_path / "s")
    assert str(error.value) == (f"{tar}: {manifest['shards'][2]['bytes'] - 512} bytes, "
                                f"{tmp_path / 's' / 'manifest.json'} says {manifest['shards'][2]['bytes']}: the shard "
                                f"is truncated or was changed; write it again with `vlp data shard`")
