"""inputs and fetch: every input kind expands to the right names, and every bad input or URL
fault becomes one clear item or one-line error (URLs from a server on 127.0.0.1)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import without_root
from httpserver import HTTPTestServer, refused_url
from hypothesis import given
from hypothesis import strategies as st

from ofacls.errors import FetchError, InputError
from ofacls.sources.expand import (
    BadInput,
    Source,
    expand_inputs,
    is_url,
    parse_list,
    read_source,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def touch(*paths: str, data: bytes = PNG) -> None:
    for p in paths:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Path(p).write_bytes(data)


def expand(*inputs: str, **kw: object) -> list[Source | BadInput]:
    return list(expand_inputs(list(inputs), **kw))  # type: ignore[arg-type]


def names(items: list[Source | BadInput]) -> list[str]:
    return [i.name for i in items]


def bad(items: list[Source | BadInput]) -> dict[str, str]:
    return {i.name: i.error for i in items if isinstance(i, BadInput)}


# --- files, URLs, order -----------------------------------------------------------


def test_file_is_a_source_named_as_given_whatever_its_extension(cwd: Path) -> None:
    touch("a.jpg", "noext", "photo.PNG", "dir/b.webp")
    items = expand("a.jpg", "noext", "./photo.PNG", "dir/../dir/b.webp")
    assert items == [
        Source("a.jpg", "a.jpg", False),
        Source("noext", "noext", False),
        Source("./photo.PNG", "./photo.PNG", False),
        Source("dir/../dir/b.webp", "dir/../dir/b.webp", False),
    ]


def test_absolute_path_kept_as_given(cwd: Path) -> None:
    touch("a.jpg")
    path = str(cwd / "a.jpg")
    assert expand(path) == [Source(path, path, False)]


def test_urls_are_sources_and_other_schemes_only_fail_when_read() -> None:
    urls = [
        "http://x.test/a.jpg",
        "HTTPS://x.test/b",
        "file:///etc/passwd",
        "ftp://x/y.png",
        "data:image/png;base64,AAAA",
    ]
    assert expand(*urls) == [Source(u, u, True) for u in urls]
    for u in urls[2:]:
        with pytest.raises(
            FetchError, match=r"^unsupported URL scheme '\w+' \(only http and https\)$"
        ):
            read_source(Source(u, u, True))


def test_is_url() -> None:
    assert is_url("http://a") and is_url("s3://b/c") and is_url("data:,x")
    assert not is_url("a.jpg") and not is_url("dir/http:/x") and not is_url("c:/x")


def test_duplicates_are_kept_in_the_order_given(cwd: Path) -> None:
    touch("a.jpg", "b.jpg")
    assert names(expand("b.jpg", "a.jpg", "b.jpg")) == ["b.jpg", "a.jpg", "b.jpg"]


def test_missing_paths_are_bad_inputs_not_exceptions(cwd: Path) -> None:
    touch("ok.jpg")
    items = expand("nope.jpg", "ok.jpg", "no/dir/x.png", "")
    assert names(items) == ["nope.jpg", "ok.jpg", "no/dir/x.png", ""]
    assert bad(items) == {
        "nope.jpg": "no such file or directory",
        "no/dir/x.png": "no such file or directory",
        "": "no such file or directory",
    }


def test_dangling_symlink_and_symlink_loop_given_directly(cwd: Path) -> None:
    os.symlink("gone.jpg", "dangling.jpg")
    os.symlink("loop", "loop")
    assert bad(expand("dangling.jpg", "loop")) == {
        "dangling.jpg": "dangling symlink",
        "loop": "symlink loop",
    }


# --- folders ----------------------------------------------------------------------


def test_folder_walk_sorted_filtered_and_named_from_the_base_as_given(cwd: Path) -> None:
    touch(
        "photos/b.jpg",
        "photos/a.PNG",
        "photos/sub/c.tiff",
        "photos/sub/deeper/d.Jpeg",
        "photos/z.gif",
        "photos/notes.md",
        "photos/.hidden.jpg",
        "photos/.cache/e.jpg",
        "photos/sub/f.bmp",
        "photos/g.webp",
        "photos/h.tif",
        "photos/readme",
    )
    expected = [
        "a.PNG",
        "b.jpg",
        "g.webp",
        "h.tif",
        "sub/c.tiff",
        "sub/deeper/d.Jpeg",
        "sub/f.bmp",
        "z.gif",
    ]
    for arg, prefix in [
        ("photos", "photos/"),
        ("photos/", "photos/"),
        ("./photos", "./photos/"),
        (str(cwd / "photos"), f"{cwd}/photos/"),
    ]:
        items = expand(arg)
        assert items == [Source(prefix + e, prefix + e, False) for e in expected], arg


def test_walking_the_current_folder(cwd: Path) -> None:
    touch("a.jpg", "sub/b.png")
    assert names(expand(".")) == ["./a.jpg", "./sub/b.png"]


def test_folder_symlinks_followed_and_loops_survived(cwd: Path) -> None:
    touch("photos/a.jpg", "photos/sub/b.jpg", "elsewhere/c.jpg")
    os.symlink("..", "photos/sub/up")  # a loop back to photos
    os.symlink("../elsewhere", "photos/linked")  # a followed folder
    os.symlink("sub", "photos/zz_same_as_sub")  # the same real folder twice
    os.symlink("self", "photos/self")  # a link that loops on itself
    os.symlink("missing.jpg", "photos/dangling.jpg")
    os.symlink("missing", "photos/dangling_other")
    items = expand("photos")
    assert names(items) == [
        "photos/a.jpg",
        "photos/dangling.jpg",
        "photos/linked/c.jpg",
        "photos/self",
        "photos/sub/b.jpg",
    ]
    assert bad(items) == {"photos/dangling.jpg": "dangling symlink", "photos/self": "symlink loop"}


def test_symlinked_folder_given_directly(cwd: Path) -> None:
    touch("real/a.jpg")
    os.symlink("real", "link")
    assert names(expand("link")) == ["link/a.jpg"]


def test_a_folder_with_no_images_is_one_bad_input(cwd: Path) -> None:
    touch("docs/readme.md")
    Path("empty").mkdir()
    assert bad(expand("docs", "empty")) == {
        "docs": "no images found in this folder",
        "empty": "no images found in this folder",
    }


def test_walk_false_refuses_folders_and_points_to_batch(cwd: Path) -> None:
    touch("photos/a.jpg", "b.jpg")
    items = expand("photos", "b.jpg", walk=False)
    assert items == [
        BadInput("photos", "is a directory (ofacls batch walks folders)"),
        Source("b.jpg", "b.jpg", False),
    ]


def test_unreadable_subfolder_is_one_bad_input(open_cwd: Path) -> None:
    touch("photos/a.jpg", "photos/locked/b.jpg")
    os.chmod("photos/locked", 0)
    try:
        with without_root():
            items = expand("photos")
    finally:
        os.chmod("photos/locked", 0o755)
    assert names(items) == ["photos/a.jpg", "photos/locked"]
    assert bad(items) == {"photos/locked": "permission denied"}


def test_deep_tree_does_not_exhaust_the_stack(cwd: Path) -> None:
    path = "d"
    for _ in range(300):
        path += "/d"
    touch(path + "/a.jpg")
    assert names(expand("d")) == [path + "/a.jpg"]


# --- globs ------------------------------------------------------------------------


def test_globs_expand_sorted_with_the_pattern_base_as_given(cwd: Path) -> None:
    touch(
        "photos/b.jpg",
        "photos/a.jpg",
        "photos/c.png",
        "photos/.h.jpg",
        "photos/sub/d.jpg",
        "photos/sub/x/e.jpg",
        "photos/.hid/f.jpg",
    )
    assert names(expand("photos/*.jpg")) == ["photos/a.jpg", "photos/b.jpg"]
    assert names(expand("./photos/*.jpg")) == ["./photos/a.jpg", "./photos/b.jpg"]
    assert names(expand("photos/?.png")) == ["photos/c.png"]
    assert names(expand("photos/[ab].jpg")) == ["photos/a.jpg", "photos/b.jpg"]
    assert names(expand("photos/**/*.jpg")) == [
        "photos/a.jpg",
        "photos/b.jpg",
        "photos/sub/d.jpg",
        "photos/sub/x/e.jpg",
    ]
    assert names(expand("photos/.*.jpg")) == ["photos/.h.jpg"]
    assert names(expand("*/sub/*.jpg")) == ["photos/sub/d.jpg"]


def test_a_glob_keeps_image_files(cwd: Path) -> None:
    touch("photos/a.jpg", "photos/b.PNG", "photos/notes.md", "photos/list.txt", "photos/raw.heic")
    assert names(expand("photos/*")) == ["photos/a.jpg", "photos/b.PNG"]
    (bad,) = expand("photos/*.heic")
    assert isinstance(bad, BadInput) and bad.error == "no images match this pattern"


def test_glob_from_the_current_folder_and_absolute(cwd: Path) -> None:
    touch("a.jpg", "s/b.jpg")
    assert names(expand("**/*.jpg")) == ["a.jpg", "s/b.jpg"]
    assert names(expand(f"{cwd}/*.jpg")) == [f"{cwd}/a.jpg"]


def test_glob_matching_folders_walks_them(cwd: Path) -> None:
    touch("2019/a.jpg", "2019/notes.md", "2020/b.png", "2021.jpg")
    assert names(expand("20*")) == ["2019/a.jpg", "2020/b.png", "2021.jpg"]
    assert names(expand("**")) == ["2019/a.jpg", "2020/b.png", "2021.jpg"]
    assert names(expand("2019/**")) == ["2019/a.jpg"]


def test_walk_false_glob_skips_the_folders_it_matches(cwd: Path) -> None:
    touch("2019/a.jpg", "2020/b.png", "2021.jpg")
    assert expand("20*", walk=False) == [Source("2021.jpg", "2021.jpg", False)]
    assert expand("2019*", "*/", walk=False) == [
        BadInput("2019*", "no images match this pattern"),
        BadInput("*/", "no images match this pattern"),
    ]


def test_walk_false_trailing_doublestar_matches_files_at_every_depth(cwd: Path) -> None:
    touch(
        "photos/a.jpg",
        "photos/notes.md",
        "photos/sub/b.png",
        "photos/sub/deeper/c.gif",
        "photos/.hidden.jpg",
        "photos/.cache/d.jpg",
    )
    os.symlink("..", "photos/sub/up")
    os.symlink("sub", "photos/zz_same_as_sub")
    everything = ["photos/a.jpg", "photos/sub/b.png", "photos/sub/deeper/c.gif"]
    # as bash globstar lists them, image files kept
    assert names(expand("photos/**", walk=False)) == everything
    assert names(expand("photos/**/", walk=False)) == ["photos/**/"]  # folders only: none left
    with_cwd = expand("**", walk=False)
    assert names(with_cwd) == everything and all(isinstance(i, Source) for i in with_cwd)
    # walking keeps "a trailing ** matches folders, which are then walked": images only
    images = ["photos/a.jpg", "photos/sub/b.png", "photos/sub/deeper/c.gif"]
    assert names(expand("photos/**")) == images


def test_glob_does_not_walk_back_into_the_folder_of_its_matches(cwd: Path) -> None:
    touch("tree/chelsea.png")
    Path("tree/sub").mkdir()
    os.symlink("..", "tree/sub/loop")
    assert names(expand("tree")) == ["tree/chelsea.png"]
    assert names(expand("tree/*")) == ["tree/chelsea.png"]
    assert names(expand("tree/*.png", "tree/[cs]*")) == ["tree/chelsea.png", "tree/chelsea.png"]
    os.chdir("tree")
    assert names(expand("*")) == ["chelsea.png"]


def test_glob_two_levels_down_yields_each_image_once(cwd: Path) -> None:
    touch("tree/chelsea.png", "tree/sub/x.png", "t/a/b/y.png", "t/a/z.png")
    os.symlink("..", "tree/sub/loop")  # back to tree, where no match lives
    os.symlink("..", "t/a/b/up")  # back to t/a, on the way to the matches
    # the loop is walked like any matched folder, but not back into tree/sub
    assert names(expand("tree/*/*")) == ["tree/sub/loop/chelsea.png", "tree/sub/x.png"]
    assert names(expand("tree/*/*")) == names(expand("tree/sub/*"))
    assert names(expand("t/*/*/*")) == ["t/a/b/up/z.png", "t/a/b/y.png"]


def test_glob_yields_each_file_once_and_survives_loops(cwd: Path) -> None:
    touch("p/a.jpg", "p/s/b.jpg")
    os.symlink("..", "p/s/up")
    os.symlink("s", "p/t")
    assert names(expand("p/**/*.jpg")) == ["p/a.jpg", "p/s/b.jpg"]
    assert names(expand("p/**")) == ["p/a.jpg", "p/s/b.jpg"]


def test_glob_with_more_than_one_doublestar(cwd: Path) -> None:
    touch("a/sub/x/b.jpg", "a/sub/c.jpg", "a/d.jpg")
    assert names(expand("**/sub/**/*.jpg")) == ["a/sub/c.jpg", "a/sub/x/b.jpg"]


def test_glob_without_matches_is_one_bad_input(cwd: Path) -> None:
    touch("a.png")
    assert expand("*.jpg") == [BadInput("*.jpg", "no images match this pattern")]
    assert expand("nodir/**/*.jpg") == [BadInput("nodir/**/*.jpg", "no images match this pattern")]


def test_existing_path_with_glob_characters_is_taken_literally(cwd: Path) -> None:
    touch("a[1].jpg", "a1.jpg", "what?.png")
    assert names(expand("a[1].jpg", "what?.png")) == ["a[1].jpg", "what?.png"]


# --- list files and stdin ---------------------------------------------------------


def test_list_file_comments_blanks_crlf_bom_urls_and_relative_paths(
    cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touch("imgs/a.jpg", "imgs/b.jpg", "lists/c.jpg")
    Path("lists/todo.txt").write_bytes(
        b"\xef\xbb\xbf# my list\r\n\r\nimgs/a.jpg\r\n   \n  imgs/b.jpg  \r\n"
        b"http://x.test/c.png\r\n# imgs/skipped.jpg\nc.jpg\nimgs"
    )
    items = expand("lists/todo.txt")
    # relative to the current folder, not the list's: c.jpg is not found
    assert names(items) == [
        "imgs/a.jpg",
        "imgs/b.jpg",
        "http://x.test/c.png",
        "c.jpg",
        "imgs/a.jpg",
        "imgs/b.jpg",
    ]
    assert items[2] == Source("http://x.test/c.png", "http://x.test/c.png", True)
    assert bad(items) == {"c.jpg": "no such file or directory"}


def test_list_file_lines_may_be_globs_but_not_lists(cwd: Path) -> None:
    touch("p/a.jpg", "p/b.jpg")
    Path("other.txt").write_text("p/a.jpg\n")
    Path("list.TXT").write_text("p/*.jpg\nother.txt\n")
    items = expand("list.TXT")
    assert names(items) == ["p/a.jpg", "p/b.jpg", "other.txt"]
    assert bad(items) == {"other.txt": "a list file cannot name another list file"}


def test_empty_list_is_one_bad_input(cwd: Path) -> None:
    Path("empty.txt").write_text("# nothing\n\n")
    assert expand("empty.txt") == [BadInput("empty.txt", "the list names no inputs")]


def test_stdin_list_text_and_bytes(cwd: Path) -> None:
    touch("a.jpg")
    items = expand("-", stdin=io.StringIO("a.jpg\n# c\nhttp://h.test/x\n"))
    assert items == [
        Source("a.jpg", "a.jpg", False),
        Source("http://h.test/x", "http://h.test/x", True),
    ]
    raw = io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfa.jpg\r\n"), encoding="latin-1")
    assert names(expand("-", stdin=raw)) == ["a.jpg"]  # BOM stripped whatever the locale


def test_stdin_read_once(cwd: Path) -> None:
    touch("a.jpg")
    items = expand("-", "-", stdin=io.StringIO("a.jpg\n"))
    assert names(items) == ["a.jpg", "-"]
    assert isinstance(items[1], BadInput)


def test_non_utf8_names_survive_a_list(cwd: Path) -> None:
    raw = b"caf\xe9.jpg"  # Latin-1 on disk
    with open(os.fsencode(cwd) + b"/" + raw, "wb") as f:
        f.write(PNG)
    items = expand("-", stdin=io.TextIOWrapper(io.BytesIO(raw + b"\n")))
    assert len(items) == 1 and isinstance(items[0], Source)
    assert read_source(items[0]) == PNG
    assert os.fsencode(items[0].name) == raw


class _Endless(io.RawIOBase):
    """A stream of `head`, then `size` bytes of one line, then `tail`, made as it is
    read: a list with a line too long to hold, holding nothing itself."""

    def __init__(self, head: bytes, size: int, tail: bytes) -> None:
        self._parts = [head, b"", tail]
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        if self._parts[0]:
            data, self._parts[0] = self._parts[0][: len(buf)], self._parts[0][len(buf):]
        elif self._left:
            data = b"x" * min(len(buf), self._left)
            self._left -= len(data)
        else:
            data, self._parts[2] = self._parts[2][: len(buf)], self._parts[2][len(buf):]
        buf[: len(data)] = data
        return len(data)


@pytest.mark.parametrize("null", [False, True])
def test_a_list_line_too_long_for_a_path_is_one_bad_input_read_in_bounded_memory(
        cwd: Path, null: bool) -> None:
    import tracemalloc

    touch("a.jpg", "b.jpg")
    sep = b"\0" if null else b"\n"
    stdin = io.BufferedReader(_Endless(b"a.jpg" + sep, 100 * 2**20, sep + b"b.jpg" + sep))
    tracemalloc.start()
    try:
        items = expand("-", stdin=stdin, null=null)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20  # the 100 MB line is never held
    what = "entry" if null else "line"
    assert items == [Source("a.jpg", "a.jpg", False),
                     BadInput("x" * 80 + "...", f"{what} 2 of the list on stdin is longer than 64 KB, "
                                                "too long for a path or URL"),
                     Source("b.jpg", "b.jpg", False)]


def test_list_lines_up_to_the_limit_are_entries_and_longer_ones_errors(cwd: Path) -> None:
    from ofacls.sources.expand import MAX_LIST_ENTRY

    longest = "d/" + "n" * (MAX_LIST_ENTRY - 2)
    Path("list.txt").write_text(f"{longest}\n{longest}y\n#{'c' * MAX_LIST_ENTRY}\nlast\n{longest}z")
    items = expand("list.txt")
    assert [i.name for i in items] == [longest, "d/" + "n" * 78 + "...", "#" + "c" * 79 + "...",
                                       "last", "d/" + "n" * 78 + "..."]
    assert [i.error.split(" is ")[0] for i in items if isinstance(i, BadInput)] == [
        "file name too long", "line 2 of list.txt", "line 3 of list.txt",
        "no such file or directory", "line 5 of list.txt"]
    text = io.StringIO(f"{longest}y\nlast\n")  # a text stdin (no bytes underneath)
    assert [i.name for i in expand("-", stdin=text)] == ["d/" + "n" * 78 + "...", "last"]


names_strategy = (
    st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), min_size=1)
    .map(str.strip)
    .filter(lambda s: bool(s) and not s.startswith("#"))
)


@given(
    entries=st.lists(names_strategy, max_size=20),
    newline=st.sampled_from(["\n", "\r\n"]),
    bom=st.booleans(),
    noise=st.lists(st.sampled_from(["", "   ", "# comment", "  # indented, comment"]), max_size=5),
)
def test_parse_list_property(entries: list[str], newline: str, bom: bool, noise: list[str]) -> None:
    lines = noise + [f"  {e}\t" for e in entries] + noise
    text = ("\ufeff" if bom else "") + newline.join(lines) + newline
    assert parse_list(text) == entries


# --- reading files ----------------------------------------------------------------


def test_read_file_ok_and_file_errors(cwd: Path) -> None:
    touch("a.jpg")
    Path("empty.jpg").write_bytes(b"")
    Path("dir").mkdir()
    os.symlink("gone.jpg", "dangling.jpg")
    os.symlink("loop.jpg", "loop.jpg")
    assert read_source(Source("a.jpg", "a.jpg", False)) == PNG
    for path, message in [
        ("missing.jpg", "no such file or directory"),
        ("dir", "is a directory"),
        ("dangling.jpg", "dangling symlink"),
        ("loop.jpg", "symlink loop"),
        ("empty.jpg", "empty file"),
    ]:
        with pytest.raises(InputError) as e:
            read_source(Source(path, path, False))
        assert str(e.value) == message
        assert not isinstance(e.value, FetchError)


def test_read_unreadable_file(open_cwd: Path) -> None:
    touch("a.jpg")
    os.chmod("a.jpg", 0)
    with without_root(), pytest.raises(InputError, match="^permission denied$"):
        read_source(Source("a.jpg", "a.jpg", False))


def test_a_device_is_never_read() -> None:
    assert expand("/dev/zero") == [BadInput("/dev/zero", "not a regular file (a character device)")]
    with pytest.raises(InputError, match=r"^not a regular file \(a character device\)$"):
        read_source(Source("/dev/zero", "/dev/zero", False), max_bytes=1024)


# --- fetching URLs ----------------------------------------------------------------


def fetch(url: str, **kw: float) -> bytes:
    return read_source(Source(url, url, True), **kw)  # type: ignore[arg-type]


def fetch_error(url: str, **kw: float) -> str:
    with pytest.raises(FetchError) as e:
        fetch(url, **kw)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_fetch_ok(http_server: HTTPTestServer) -> None:
    assert fetch(http_server.serve("/a.png", PNG)) == PNG
    assert fetch(http_server.serve("/b", PNG, content_type=None, content_length=False)) == PNG
    assert fetch(http_server.serve("/c", PNG, content_type="application/octet-stream")) == PNG
    assert fetch(http_server.url("/a.png") + "?x=1#frag") == PNG
    assert http_server.requests[-1] == "/a.png?x=1"


def test_fetch_quotes_spaces_and_non_ascii(http_server: HTTPTestServer) -> None:
    http_server.serve("/my%20caf%C3%A9.png", PNG)
    assert fetch(http_server.url("/my café.png")) == PNG
    assert fetch(http_server.url("/my%20caf%C3%A9.png")) == PNG


def test_http_errors(http_server: HTTPTestServer) -> None:
    assert fetch_error(http_server.url("/nothing-here")) == "HTTP 404 Not Found"
    http_server.serve("/boom", b"oops", status=500, content_type="text/plain")
    assert fetch_error(http_server.url("/boom")) == "HTTP 500 Internal Server Error"
    http_server.serve("/gone", b"", status=410)
    assert fetch_error(http_server.url("/gone")) == "HTTP 410 Gone"


def test_html_and_text_are_not_images(http_server: HTTPTestServer) -> None:
    http_server.serve("/page", b"<html></html>", content_type="text/html; charset=utf-8")
    http_server.serve("/json", b"{}", content_type="application/json")
    assert fetch_error(http_server.url("/page")) == "not an image: text/html"
    assert fetch_error(http_server.url("/json")) == "not an image: application/json"


def test_empty_response(http_server: HTTPTestServer) -> None:
    http_server.serve("/empty", b"")
    assert fetch_error(http_server.url("/empty")) == "empty response"


def test_server_that_never_answers_times_out(http_server: HTTPTestServer) -> None:
    t0 = time.monotonic()
    assert fetch_error(http_server.hang("/hang"), timeout=1) == "timed out after 1 s"
    assert time.monotonic() - t0 < 3


def test_trickling_body_times_out_on_the_whole_download(http_server: HTTPTestServer) -> None:
    t0 = time.monotonic()
    assert fetch_error(http_server.trickle("/drip"), timeout=1) == "timed out after 1 s"
    assert fetch_error(http_server.trickle("/drip2", content_length=10**6), timeout=0.5) == (
        "timed out after 0.5 s"
    )
    assert time.monotonic() - t0 < 4


def test_endless_body_hits_the_size_cap(http_server: HTTPTestServer) -> None:
    t0 = time.monotonic()
    assert fetch_error(http_server.endless("/big"), max_bytes=2**20) == "larger than the 1 MB limit"
    assert time.monotonic() - t0 < 5


def test_content_length_over_the_cap_is_refused_before_reading(http_server: HTTPTestServer) -> None:
    http_server.trickle("/huge", content_length=100 * 2**20)  # would time out if read
    t0 = time.monotonic()
    assert fetch_error(http_server.url("/huge"), max_bytes=50 * 2**20, timeout=10) == (
        "larger than the 50 MB limit (100 MB)"
    )
    assert time.monotonic() - t0 < 2


def test_redirects_followed_and_bounded(http_server: HTTPTestServer) -> None:
    http_server.serve("/img.png", PNG)
    http_server.redirect("/r1", "/img.png", status=301)
    http_server.redirect("/r2", http_server.url("/r1"), status=307)
    assert fetch(http_server.url("/r2")) == PNG
    for i in range(7):
        http_server.redirect(f"/chain{i}", f"/chain{i + 1}")
    http_server.serve("/chain7", PNG)
    assert fetch(http_server.url("/chain1"), max_redirects=6) == PNG
    assert fetch_error(http_server.url("/chain0"), max_redirects=6) == (
        "too many redirects (more than 6)"
    )


def test_redirect_loop(http_server: HTTPTestServer) -> None:
    http_server.redirect("/a", "/b")
    http_server.redirect("/b", "/a")
    http_server.redirect("/self", "/self")
    assert fetch_error(http_server.url("/a")) == "redirect loop"
    assert fetch_error(http_server.url("/self")) == "redirect loop"


def test_redirect_to_another_scheme_is_refused(http_server: HTTPTestServer) -> None:
    http_server.redirect("/evil", "file:///etc/passwd")
    http_server.redirect("/ftp", "ftp://example.test/x.png")
    assert fetch_error(http_server.url("/evil")) == (
        "redirect to unsupported URL scheme 'file' (only http and https)"
    )
    assert "ftp" in fetch_error(http_server.url("/ftp"))


def test_connection_refused() -> None:
    assert fetch_error(refused_url()) == "connection refused"


def test_bad_urls() -> None:
    assert fetch_error("http://127.0.0.1:99999/x").startswith("bad URL")
    assert fetch_error("http:///x").startswith("bad URL")


def test_http_proxy_from_the_environment(
    http_server: HTTPTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    http_server.serve("http://images.invalid/cat.png", PNG)
    monkeypatch.setenv("http_proxy", http_server.url(""))
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert fetch("http://images.invalid/cat.png") == PNG
    assert http_server.requests == ["http://images.invalid/cat.png"]
    # no_proxy is honoured: 127.0.0.2 is then reached directly, where nothing listens
    http_server.serve("/direct.png", PNG)
    proxied = f"http://127.0.0.2:{http_server.port}/direct.png"
    assert fetch(proxied) == PNG
    monkeypatch.setenv("no_proxy", "127.0.0.2")
    assert fetch_error(proxied) == "connection refused"


def test_inputs_fetch_and_writers_stay_light() -> None:
    """They sit below the CLI: importing them must not pull in heavy or UI packages
    (urllib3 included: fetch imports it on the first download)."""
    code = (
        "import sys, ofacls.sources.expand, ofacls.sources.fetch, ofacls.formats, ofacls.outfile; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'PIL', 'rich', 'typer', 'modelscope', 'numpy', 'urllib3'}))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_a_huge_local_file_is_refused_without_reading_it(tmp_path, monkeypatch) -> None:
    import ofacls.sources.expand as inputs
    from ofacls.errors import InputError

    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:  # sparse: 3 GB of size, no disk used
        f.truncate(3 * 2**30)
    with pytest.raises(InputError, match="over the 1 GB limit"):
        inputs.read_source(inputs.Source(str(big), str(big), False))
    monkeypatch.setattr(inputs, "MAX_FILE_BYTES", 10)
    small = tmp_path / "x.jpg"
    small.write_bytes(b"0123456789A")
    with pytest.raises(InputError, match="over the"):
        inputs.read_source(inputs.Source(str(small), str(small), False))
