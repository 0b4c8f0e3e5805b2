"""pipeline.sources: every kind of input, deterministic names, clear refusals."""
from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.sources import InputError, enumerate_input, read_item
from tests.conftest import good_corpus


def test_directory_is_recursive_deterministic_and_names_are_unique(image_folder):
    root = image_folder(with_bad=False)
    items = enumerate_input(str(root))
    sources = [i.source for i in items]
    assert len(items) == len(good_corpus()) + 1  # + b/deeper/plain.jpg; readme.txt skipped
    assert sources == sorted(sources)
    assert len({i.name for i in items}) == len(items)
    assert sorted(i.name for i in items if i.name.endswith("plain.jpg")) == ["a/plain.jpg", "b/deeper/plain.jpg"]
    again = enumerate_input(str(root))
    assert again == items


def test_names_do_not_depend_on_where_the_folder_lives(image_folder, tmp_path):
    first = enumerate_input(str(image_folder(with_bad=False, root=tmp_path / "x" / "images")))
    second = enumerate_input(str(image_folder(with_bad=False, root=tmp_path / "y" / "images")))
    assert [i.name for i in first] == [i.name for i in second]


def test_glob(image_folder):
    root = image_folder(with_bad=False)
    items = enumerate_input(f"{root}/**/*.jpg")
    assert {i.source.rsplit("/", 1)[-1] for i in items} == {"plain.jpg", "rotated.jpg", "cmyk.jpg", "large.jpg"}
    with pytest.raises(InputError, match="matches no image"):
        enumerate_input(f"{root}/**/*.gif")


def test_text_list_keeps_its_order_and_names_missing_files(image_folder, tmp_path):
    root = image_folder(with_bad=False)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos\nimages/a/rotated.jpg\n{root}/a/plain.jpg\n\nimages/a/missing.jpg\nimages/a/rotated.jpg\n")
    items = enumerate_input(str(listing))
    assert [i.source.rsplit("/", 1)[-1] for i in items] == ["rotated.jpg", "plain.jpg", "missing.jpg"]
    assert read_item(items[0]) == good_corpus()["rotated.jpg"]
    with pytest.raises(FileNotFoundError):
        read_item(items[2])  # reported per image by the worker, not fatal here


def test_parquet_list(image_folder, tmp_path):
    image_folder(with_bad=False)
    listing = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": ["images/a/photo.bmp", "images/a/photo.tif"]}), listing)
    items = enumerate_input(str(listing))
    assert [read_item(i) for i in items] == [good_corpus()["photo.bmp"], good_corpus()["photo.tif"]]
    pq.write_table(pa.table({"url": ["x.jpg"]}), listing)
    with pytest.raises(InputError, match="column named one of"):
        enumerate_input(str(listing))


def test_webdataset_tar_members_are_read_by_byte_range(tmp_path):
    tar = tmp_path / "sa_000007.tar"
    corpus = good_corpus()
    with wds.TarWriter(str(tar)) as writer:
        writer.write({"__key__": "sa_1", "jpg": corpus["plain.jpg"], "json": {"image": {}}})
        writer.write({"__key__": "sa_2", "png": corpus["alpha.png"], "txt": "caption"})
        writer.write({"__key__": "sa_3", "json": {"no": "image"}})
    items = enumerate_input(str(tmp_path))  # a directory of tars
    assert [i.member for i in items] == ["sa_1.jpg", "sa_2.png"]
    assert [read_item(i) for i in items] == [corpus["plain.jpg"], corpus["alpha.png"]]
    assert items[0].name == "sa_000007.tar/sa_1.jpg" and items[0].source.endswith("sa_000007.tar#sa_1.jpg")
    assert enumerate_input(str(tar)) == items


def test_fsspec_urls(image_folder):
    memory = fsspec.filesystem("memory")
    for name, data in list(good_corpus().items())[:3]:
        memory.pipe(f"/bucket/photos/{name}", data)
    items = enumerate_input("memory://bucket/photos")
    assert len(items) == 3 and all(i.url.startswith("memory://") for i in items)
    assert read_item(items[0]) == memory.cat(items[0].url)


def test_output_inside_the_input_is_not_enumerated(image_folder):
    root = image_folder(with_bad=False)
    (root / "out" / "shards").mkdir(parents=True)
    (root / "out" / "shards" / "x.jpg").write_bytes(good_corpus()["plain.jpg"])
    assert not any("/out/" in i.source for i in enumerate_input(str(root), exclude=str(root / "out")))


def test_unusable_inputs_fail_clearly(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        enumerate_input(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        enumerate_input(str(tmp_path / "empty"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="cannot tell what"):
        enumerate_input(str(tmp_path / "data.csv"))
