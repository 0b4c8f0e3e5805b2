"""pipeline.inputs.entries: every kind of input, deterministic names, clear refusals."""
from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.inputs.entries import InputError, enumerate_input, read_item
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
    listing.write_text(f"# photos\nimages/a/rotated.jpg\n{root}/a/plain.jpg\n\n"
                       "images/a/missing.jpg\nimages/a/rotated.jpg\n")
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



# --- entries that are not regular files, links, odd names --------------------------------
def _enumerate_within(seconds: float, *args, **kwargs):
    """enumerate_input, failing (instead of hanging the suite) if it blocks: opening a
    FIFO that no one writes blocks forever."""
    import threading

    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(items=enumerate_input(*args, **kwargs)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "enumeration blocked (it opened a special file?)"
    return result["items"]


def _special_files(root) -> None:
    import os
    import socket

    os.mkfifo(root / "pipe.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "sock.png"))
    server.close()  # the socket file stays


def test_special_files_become_items_with_a_problem_and_are_never_opened(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "ok.jpg").write_bytes(good_corpus()["plain.jpg"])
    _special_files(root)
    items = {i.source.rsplit("/", 1)[-1]: i for i in _enumerate_within(10, str(root))}
    assert set(items) == {"ok.jpg", "pipe.jpg", "zero.jpg", "sock.png"}
    assert items["ok.jpg"].problem is None
    assert "FIFO" in items["pipe.jpg"].problem and "not opened" in items["pipe.jpg"].problem
    assert "/dev/zero" in items["zero.jpg"].problem and "character device" in items["zero.jpg"].problem
    assert "socket" in items["sock.png"].problem
    # The same when the input names one directly.
    (only,) = _enumerate_within(10, str(root / "pipe.jpg"))
    assert "FIFO" in only.problem


def test_read_item_refuses_a_fifo_swapped_in_after_enumeration(tmp_path):
    import os

    from pipeline.inputs.entries import ReadRefused

    (tmp_path / "x.jpg").write_bytes(good_corpus()["plain.jpg"])
    (item,) = enumerate_input(str(tmp_path / "x.jpg"))
    (tmp_path / "x.jpg").unlink()
    os.mkfifo(tmp_path / "x.jpg")
    with pytest.raises(ReadRefused, match="FIFO"):
        read_item(item)  # would block forever if it opened the FIFO


def test_symlinks_out_of_the_input_are_refused_unless_followed(tmp_path, caplog):
    root, outside = tmp_path / "in", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    (outside / "folder").mkdir(parents=True)
    plain = good_corpus()["plain.jpg"]
    (root / "sub" / "real.jpg").write_bytes(plain)
    (outside / "secret.jpg").write_bytes(plain)
    (outside / "folder" / "far.jpg").write_bytes(plain)
    (root / "out.jpg").symlink_to(outside / "secret.jpg")
    (root / "in.jpg").symlink_to(root / "sub" / "real.jpg")
    (root / "gone.jpg").symlink_to(root / "nowhere.jpg")
    (root / "linked_out").symlink_to(outside / "folder")
    (root / "linked_in").symlink_to(root / "sub")
    (root / "sub" / "loop").symlink_to(root)

    with caplog.at_level("INFO", logger="pipeline.inputs.entries"):
        items = {i.source.rsplit("/", 1)[-1]: i for i in enumerate_input(str(root))}
    assert set(items) == {"real.jpg", "out.jpg", "in.jpg", "gone.jpg"}  # no folder listed twice
    assert items["in.jpg"].problem is None and read_item(items["in.jpg"]) == plain
    assert "outside the input" in items["out.jpg"].problem and "stage.follow_symlinks=true" in items["out.jpg"].problem
    assert "broken symbolic link" in items["gone.jpg"].problem and "not found" in items["gone.jpg"].problem
    log = caplog.text
    assert "linked_out" in log and "folder outside the input" in log and "stage.follow_symlinks=true" in log
    assert "linked_in" in log and "folder inside the input" in log

    followed = {i.source.rsplit("/", 1)[-1]: i for i in enumerate_input(str(root), follow_symlinks=True)}
    assert set(followed) == {"real.jpg", "out.jpg", "in.jpg", "gone.jpg", "far.jpg"}
    assert followed["out.jpg"].problem is None and read_item(followed["out.jpg"]) == plain
    assert followed["far.jpg"].source.endswith("in/linked_out/far.jpg")


def test_output_exclusion_compares_resolved_paths(tmp_path, monkeypatch):
    root = tmp_path / "in"
    (root / "out" / "shards").mkdir(parents=True)
    (root / "a.jpg").write_bytes(good_corpus()["plain.jpg"])
    (root / "out" / "shards" / "x.jpg").write_bytes(good_corpus()["plain.jpg"])
    (tmp_path / "alias").symlink_to(root / "out")
    monkeypatch.chdir(root)
    for exclude in (str(tmp_path / "alias"), "out", f"{root}/out/../out/"):
        assert [i.source.rsplit("/", 1)[-1] for i in enumerate_input(str(root), exclude=exclude)] == ["a.jpg"], exclude


def test_undecodable_file_names_are_shown_escaped_and_still_read(tmp_path):
    import os

    root = tmp_path / "in"
    root.mkdir()
    name = b"caf\xe9 \xff.jpg"  # latin-1 and a byte no encoding uses
    with open(os.path.join(os.fsencode(root), name), "wb") as f:
        f.write(good_corpus()["plain.jpg"])
    (item,) = enumerate_input(str(root))
    assert item.source.endswith("caf\\xe9 \\xff.jpg")
    item.source.encode("utf-8")  # valid UTF-8, as Parquet requires
    assert item.problem is None and read_item(item) == good_corpus()["plain.jpg"]
    pq.write_table(pa.table({"source": [item.source], "name": [item.name]}), tmp_path / "m.parquet")


def test_a_folder_named_like_a_glob_is_a_folder(tmp_path, caplog):
    root = tmp_path / "photos [2019]"
    root.mkdir()
    (root / "x.jpg").write_bytes(good_corpus()["plain.jpg"])
    (root / "notes.txt").write_text("not an image")
    with caplog.at_level("INFO", logger="pipeline.inputs.entries"):
        (item,) = enumerate_input(str(root))
    assert item.source == f"{root}/x.jpg"
    assert ".txt (1)" in caplog.text  # what was skipped is said
    with pytest.raises(InputError, match="read as a pattern"):
        enumerate_input(str(tmp_path / "photos [2020]"))


# --- tars ------------------------------------------------------------------------------
def _tar(path, count: int = 2) -> bytes:
    with wds.TarWriter(str(path)) as writer:
        for n in range(count):
            writer.write({"__key__": f"sa_{n}", "jpg": good_corpus()["plain.jpg"], "json": {"n": n}})
    return path.read_bytes()


def test_damaged_tars_are_items_naming_the_problem_and_good_members_survive(tmp_path):
    import gzip

    root = tmp_path / "in"
    root.mkdir()
    whole = _tar(tmp_path / "whole.tar", count=3)
    (root / "a_empty.tar").write_bytes(b"")
    (root / "b_garbage.tar").write_bytes(b"<html>not a tar</html>" * 40)
    (root / "c_gzip.tar").write_bytes(gzip.compress(whole))
    # Cut inside the third member's image: the first two are whole.
    third = whole.index(b"sa_2.jpg")
    (root / "d_cut.tar").write_bytes(whole[: third + 512 + 100])
    damaged = bytearray(whole)
    second = whole.index(b"sa_1.jpg")
    damaged[second : second + 100] = b"\x07" * 100  # the second image's header
    (root / "e_damaged.tar").write_bytes(bytes(damaged))
    (root / "f_good.tar").write_bytes(whole)

    items = enumerate_input(str(root))
    by_source = {i.source.split("/in/", 1)[1]: i for i in items}
    problems = {s: i.problem for s, i in by_source.items() if i.problem}
    assert "empty file" in problems["a_empty.tar"]
    assert "not a readable tar" in problems["b_garbage.tar"]
    assert "gzip" in problems["c_gzip.tar"]
    assert "truncated" in problems["d_cut.tar#sa_2.jpg"]
    assert "d_cut.tar#sa_0.jpg" in by_source and by_source["d_cut.tar#sa_0.jpg"].problem is None
    assert "d_cut.tar" not in by_source  # the cut member's row says it all
    assert "damaged tar" in problems["e_damaged.tar"] and "after 2 members" in problems["e_damaged.tar"]
    assert by_source["e_damaged.tar#sa_0.jpg"].problem is None
    assert [s for s in by_source if s.startswith("f_good")] == [f"f_good.tar#sa_{n}.jpg" for n in range(3)]
    for source, item in by_source.items():
        if item.problem is None:
            assert read_item(item) == good_corpus()["plain.jpg"], source


# --- lists -----------------------------------------------------------------------------
def test_list_lines_with_unusable_schemes_become_items_with_a_problem(tmp_path):
    (tmp_path / "one.jpg").write_bytes(good_corpus()["plain.jpg"])
    listing = tmp_path / "list.txt"
    listing.write_text("one.jpg\nbogus://bucket/x.jpg\ngs://bucket/y.jpg\nbogus://bucket/z.jpg\n")
    items = {i.source: i for i in enumerate_input(str(listing))}
    assert items[str(tmp_path / "one.jpg")].problem is None
    assert "unsupported URL scheme 'bogus://'" in items["bogus://bucket/x.jpg"].problem
    assert "bogus" in items["bogus://bucket/z.jpg"].problem
    assert "gcsfs" in items["gs://bucket/y.jpg"].problem  # known scheme, package not installed


def test_a_latin1_list_is_read_line_by_line(tmp_path):
    import os

    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"), "wb") as f:
        f.write(good_corpus()["plain.jpg"])
    (tmp_path / "plain.jpg").write_bytes(good_corpus()["rotated.jpg"])
    (tmp_path / "list.txt").write_bytes("café.jpg\r\nplain.jpg\r\nna\u00efve.jpg\n".encode("latin-1"))
    items = enumerate_input(str(tmp_path / "list.txt"))
    assert [i.source.rsplit("/", 1)[-1] for i in items] == ["caf\\xe9.jpg", "plain.jpg", "na\\xefve.jpg"]
    assert read_item(items[0]) == good_corpus()["plain.jpg"]  # the file with that latin-1 name
    assert read_item(items[1]) == good_corpus()["rotated.jpg"]
    with pytest.raises(FileNotFoundError):
        read_item(items[2])  # an error row for that line, the others go on


def test_a_parquet_list_needs_a_column_of_strings(tmp_path):
    (tmp_path / "x.jpg").write_bytes(good_corpus()["plain.jpg"])
    listing = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": [1, 2], "file": ["x.jpg", None]}), listing)
    (item,) = enumerate_input(str(listing))  # the integer column is passed over
    assert read_item(item) == good_corpus()["plain.jpg"]
    pq.write_table(pa.table({"path": [1, 2]}), listing)
    with pytest.raises(InputError, match=r"holding paths as strings; found path \(int64\)"):
        enumerate_input(str(listing))
    listing.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="cannot read the Parquet list"):
        enumerate_input(str(listing))


def test_read_item_refuses_files_over_the_size_limit_before_reading_them(tmp_path):
    from pipeline.inputs.entries import ReadRefused

    (tmp_path / "x.jpg").write_bytes(good_corpus()["plain.jpg"])
    (item,) = enumerate_input(str(tmp_path / "x.jpg"))
    size = len(good_corpus()["plain.jpg"])
    assert read_item(item, max_bytes=size) == good_corpus()["plain.jpg"]
    with pytest.raises(ReadRefused, match=f"file of {size} bytes exceeds stage.image.max_file_bytes={size - 1}"):
        read_item(item, max_bytes=size - 1)
    _tar(tmp_path / "t.tar", count=1)
    (member,) = enumerate_input(str(tmp_path / "t.tar"))
    with pytest.raises(ReadRefused, match="max_file_bytes"):
        read_item(member, max_bytes=size - 1)
    memory = fsspec.filesystem("memory")
    memory.pipe("/limits/x.jpg", good_corpus()["plain.jpg"])
    (remote,) = enumerate_input("memory://limits")
    with pytest.raises(ReadRefused, match="max_file_bytes"):
        read_item(remote, max_bytes=size - 1)
