"""The url_list download against a loopback HTTP server: every URL accounted for, shards, resize, resume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from PIL import Image

from diht_core.data.fetch import FetchError, fetch
from diht_core.data.loopback import LoopbackServer, closed_port, image_bytes, mixed_url_list
from diht_core.data.resize import RESIZE_MODES, ImageError, load_image, resize
from diht_core.data.shards import iter_shard, read_samples, shard_paths
from diht_core.data.url_download import download_url_list
from diht_core.data.url_lists import read_url_list
from diht_core.config import ParamsError, UrlListParams, validate_params

from conftest import ROOT, tiny_params

def fast(**kw) -> UrlListParams:
    return UrlListParams(timeout=1.0, max_bytes=2_000_000, **kw)


FAST = fast()


@pytest.fixture(scope="module")
def server():
    with LoopbackServer() as srv:
        yield srv


def _rows(out) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))], ignore_index=True)


def _samples(out) -> list[dict]:
    return [s for shard in shard_paths(out) for s in read_samples(shard)]


def test_every_url_accounted_for_with_its_reason(server, tmp_path):
    urls = mixed_url_list(server.base, 50, slow_ms=2500)
    extra = {  # the rare kinds, one each
        "/huge/3000000": "too_large", "/huge_nolength/3000000": "too_large", "/bomb.png": "decompression_bomb",
        "/trickle/200/img/400x400/7.png": "timeout", "/noai/img/64x64/1.jpg": "opted_out",
        "/octet/img/64x48/2.jpg": "ok", "/redirect/9/img/64x64/3.jpg": "too_many_redirects",
        "/img/80x60/4.webp": "ok", "/status/500": "http_500", "/loop/a": "redirect_loop",
    }
    extra_rows = [{"url": server.url(p), "caption": f"extra {p}", "expected": r} for p, r in extra.items()]
    extra_rows += [{"url": "ftp://example.com/a.jpg", "caption": "", "expected": "invalid_url"},
                   {"url": "", "caption": "", "expected": "invalid_url"}]
    urls = pd.concat([urls, pd.DataFrame(extra_rows)], ignore_index=True)
    assert (urls.expected.isin(["http_404", "connection_error"])).mean() >= 0.15  # dead links

    out = tmp_path / "shards"
    stats = download_url_list(urls, out, fast(threads=8, shard_size=20, allow_private=True), progress=False)

    rows = _rows(out)
    assert rows.key.tolist() == [f"{i:09d}" for i in range(len(urls))]  # every URL once, in order
    assert rows.reason.tolist() == urls.expected.tolist()
    assert ((rows.status == "success") == (rows.reason == "ok")).all()
    assert rows[rows.reason != "ok"].error_message.str.len().gt(0).all()
    expected_counts = urls.expected.value_counts().to_dict()
    assert stats["reasons"] == expected_counts and stats["count"] == len(urls)
    assert stats["successes"] == expected_counts["ok"] and stats["failed"] == len(urls) - expected_counts["ok"]
    on_disk = json.loads((out / "_stats.json").read_text())
    assert on_disk["reasons"] == expected_counts and on_disk["images_per_s"] > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{i:05d}.{e}" for i in range(4) for e in ("tar", "parquet")] + ["_stats.json"])
    assert [len(pd.read_parquet(p)) for p in sorted(out.glob("*.parquet"))] == [20, 20, 20, 2]

    samples = _samples(out)
    ok = rows[rows.reason == "ok"]
    assert [s["key"] for s in samples] == ok.key.tolist()  # only successes in the tars
    for s, r in zip(samples, ok.itertuples()):
        meta = s["json"]
        assert meta["url"] == r.url and meta["key"] == r.key and meta["status"] == "success"
        assert meta["error_message"] is None and s["txt"] == r.caption == meta["caption"]
        assert meta["sha256"] == r.sha256 == hashlib.sha256(s["image_bytes"]).hexdigest()
        img = Image.open(io.BytesIO(s["image_bytes"]))
        assert img.format == "JPEG" and img.size == (meta["width"], meta["height"]) == (256, 256)  # border
        assert meta["original_width"] > 0 and meta["original_height"] > 0


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("w, h", [(400, 200), (120, 300), (64, 64)])
def test_resize_geometry(mode, w, h):
    img = Image.new("RGB", (w, h), (200, 10, 10))
    out = resize(img, mode, 128)
    short, long_ = min(w, h), max(w, h)
    expected = {
        "no": (w, h),
        "keep_ratio": (round(w * 128 / short), round(h * 128 / short)),
        "keep_ratio_largest": (round(w * 128 / long_), round(h * 128 / long_)),
        "center_crop": (128, 128),
        "border": (128, 128),
    }[mode]
    assert out.size == expected
    if mode == "border" and w != h:  # black bars on the short side, the picture in the middle
        px = out.load()
        assert px[0, 0] == (0, 0, 0) and px[64, 64][0] > 150
    if mode != "no":
        assert resize(img, mode, 512, only_if_bigger=True).size == (w, h)  # no upscaling when asked


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_resize_modes_through_the_download(server, tmp_path, mode):
    sizes = [(640, 320), (50, 100), (256, 256)]
    urls = pd.DataFrame({"url": [server.url(f"/img/{w}x{h}/{i}.png") for i, (w, h) in enumerate(sizes)],
                         "caption": ["a", "b", "c"]})
    cfg = fast(threads=3, resize_mode=mode, image_size=64)
    download_url_list(urls, tmp_path, cfg, progress=False)
    got = [(s["json"]["original_width"], s["json"]["original_height"], s["json"]["width"], s["json"]["height"])
           for s in _samples(tmp_path)]
    expected = {"no": [(640, 320), (50, 100), (256, 256)], "keep_ratio": [(128, 64), (64, 128), (64, 64)],
                "keep_ratio_largest": [(64, 32), (32, 64), (64, 64)], "center_crop": [(64, 64)] * 3,
                "border": [(64, 64)] * 3}[mode]
    assert got == [(*wh, *e) for wh, e in zip(sizes, expected)]


def test_image_checks():
    with pytest.raises(ImageError) as err:
        load_image(image_bytes(100, 100, 0, "png"), max_pixels=50 * 50)
    assert err.value.reason == "decompression_bomb"
    for bad in (b"", b"<html></html>", image_bytes(100, 100, 0, "jpg")[:300]):
        with pytest.raises(ImageError) as err:
            load_image(bad, max_pixels=10**8)
        assert err.value.reason == "decode_error"
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # transparent: matted on white
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert load_image(buf.getvalue(), 10**8).getpixel((0, 0)) == (255, 255, 255)


def test_retries_with_exponential_backoff(server):
    sleeps = []
    cfg = UrlListParams(timeout=2, retries=2, backoff=0.01)
    assert fetch(server.url("/flaky/t1/2/img/32x32/0.jpg"), cfg, sleep=sleeps.append) == image_bytes(32, 32, 0)
    assert sleeps == [0.01, 0.02]
    with pytest.raises(FetchError) as err:
        fetch(server.url("/flaky/t2/2/img/32x32/0.jpg"), UrlListParams(timeout=2, retries=1), sleep=sleeps.append)
    assert err.value.reason == "http_503" and err.value.attempts == 2
    sleeps.clear()
    with pytest.raises(FetchError) as err:  # a 404 is final
        fetch(server.url("/status/404"), cfg, sleep=sleeps.append)
    assert err.value.reason == "http_404" and err.value.attempts == 1 and sleeps == []
    with pytest.raises(FetchError) as err:
        fetch(f"http://127.0.0.1:{closed_port()}/x.jpg", UrlListParams(retries=1, backoff=0))
    assert err.value.reason == "connection_error" and err.value.attempts == 2


def test_url_list_formats(tmp_path):
    cc3m = tmp_path / "Train_GCC-training.tsv"  # CC3M: caption<TAB>url, no header, bare quotes in captions
    cc3m.write_text('a "quoted" dog runs\thttp://a/1.jpg\nbird on a wire\thttp://a/2.jpg\n')
    assert read_url_list(cc3m).to_dict("list") == {"url": ["http://a/1.jpg", "http://a/2.jpg"],
                                                   "caption": ['a "quoted" dog runs', "bird on a wire"]}
    headed = tmp_path / "list.tsv"
    headed.write_text("url\tcaption\nhttp://a/1.jpg\tone\n")
    assert read_url_list(headed).caption.tolist() == ["one"]
    csv = tmp_path / "list.csv"
    csv.write_text('id,link,text\n1,http://a/1.jpg,"one, with comma"\n2,http://a/2.jpg,\n')
    df = read_url_list(csv, UrlListParams(url_col="link", caption_col="text"))
    assert df.to_dict("list") == {"url": ["http://a/1.jpg", "http://a/2.jpg"], "caption": ["one, with comma", ""]}
    laion = tmp_path / "part-00000.parquet"
    pd.DataFrame({"URL": ["http://a/1.jpg", None], "TEXT": ["one", None], "WIDTH": [1, 2]}).to_parquet(laion)
    assert read_url_list(laion, UrlListParams(url_col="URL", caption_col="TEXT")).to_dict("list") == {
        "url": ["http://a/1.jpg", ""], "caption": ["one", ""]}
    txt = tmp_path / "urls.txt"
    txt.write_text("http://a/1.jpg\n\nhttp://a/2.jpg\n")
    assert read_url_list(txt).caption.tolist() == ["", ""]
    with pytest.raises(ValueError, match="no URL column 'url'"):
        read_url_list(laion)
    with pytest.raises(ValueError, match="cannot tell"):
        read_url_list(tmp_path / "list.json")


@pytest.mark.parametrize("raw, key", [
    ({"download": {"source": "url_list"}}, "download.url_list.path"),
    ({"download": {"url_list": {"path": "list.json"}}}, "download.url_list.format"),
    ({"download": {"url_list": {"resize_mode": "squash"}}}, "download.url_list.resize_mode"),
    ({"download": {"url_list": {"threads": 0}}}, "download.url_list.threads"),
    ({"download": {"url_list": {"max_byte": 10}}}, "download.url_list.max_byte"),
    ({"download": {"url_list": {"task_runner": "ray"}}}, "download.url_list.task_runner"),
    ({"download": {"url_list": {"processes": 0}}}, "download.url_list.processes"),
])
def test_url_list_params_are_validated(raw, key):
    with pytest.raises(ParamsError) as err:
        validate_params(raw, "params.yaml")
    assert key in str(err.value)
    assert validate_params({"download": {"source": "url_list", "url_list": {"path": "x.tsv.gz"}}})


def test_rerun_skips_finished_shards_and_redoes_changed_ones(server, tmp_path):
    urls = pd.DataFrame({"url": [server.url(f"/img/40x30/{i}.jpg") for i in range(25)], "caption": ["c"] * 25})
    cfg = fast(threads=4, shard_size=10)
    download_url_list(urls, tmp_path, cfg, progress=False)
    before = {p.name: os.stat(p) for p in tmp_path.glob("0*")}
    (tmp_path / "00001.tar.tmp").write_bytes(b"half a shard")  # left by a killed run
    (tmp_path / "0.tar").write_bytes(b"")  # a shard of another source (the synthetic one)
    stats = download_url_list(urls, tmp_path, cfg, progress=False)
    assert stats["resumed_shards"] == 3 and stats["fetched_this_run"] == 0 and stats["successes"] == 25
    assert {p.name: os.stat(p) for p in tmp_path.glob("0*")} == before  # nothing rewritten, stale files gone
    urls.loc[12, "url"] = server.url("/status/404")  # a changed row: only its shard is redone
    stats = download_url_list(urls, tmp_path, cfg, progress=False)
    assert stats["resumed_shards"] == 2 and stats["fetched_this_run"] == 10 and stats["reasons"]["http_404"] == 1
    after = {p.name: os.stat(p) for p in tmp_path.glob("0*")}
    assert [n for n in before if before[n].st_mtime_ns != after[n].st_mtime_ns] == ["00001.parquet", "00001.tar"]
    urls2 = urls.head(15)  # a shorter list: its shards only
    download_url_list(urls2, tmp_path, cfg, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar", "00001.tar"]


DRIVER = """
import sys, pandas as pd
from diht_core.config import UrlListParams
from diht_core.data.url_download import download_url_list
download_url_list(pd.read_parquet(sys.argv[1]), sys.argv[2],
                  UrlListParams(timeout=5, threads=2, shard_size=8), progress=False)
"""


def test_kill_9_and_resume(server, tmp_path):
    n = 48  # 6 shards of 8; each good URL takes 0.15 s and 2 threads fetch: a shard takes about 0.6 s
    urls = pd.DataFrame({"url": [server.url(f"/slow/150/img/40x30/{i}.jpg") if i % 5 else server.url("/status/404")
                                 for i in range(n)], "caption": [f"caption {i}" for i in range(n)]})
    urls.to_parquet(tmp_path / "list.parquet")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "list.parquet"), str(out)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (out / "00000.parquet").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the first shard never finished"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.stem for p in out.glob("*.parquet")}
    assert "00000" in finished and len(finished) < 6, finished
    before = {p.name: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in out.iterdir() if p.stem in finished}

    stats = download_url_list(urls, out, UrlListParams(timeout=5, threads=2, shard_size=8),
                              progress=False)
    assert stats["resumed_shards"] == len(finished) and stats["count"] == n
    assert {p: (os.stat(out / p).st_ino, os.stat(out / p).st_mtime_ns) for p in before} == before
    keys = [s["__key__"] for shard in shard_paths(out) for s in iter_shard(shard)]
    assert sorted(keys) == keys and len(keys) == len(set(keys))  # no duplicate
    assert keys == [f"{i:09d}" for i in range(n) if i % 5]  # nothing lost
    assert _rows(out).key.tolist() == [f"{i:09d}" for i in range(n)]
    assert not list(out.glob("*.tmp"))


class _Run:
    def log_artifact(self, path, subdir=None):
        pass


def test_url_list_stage_then_cat_filter(server, tmp_path):
    """tasks.download with source url_list fills data/raw/train, and cat_filter runs on it unchanged."""
    from diht_core.config import deep_merge
    from tasks import cat_filter, download

    captions = ["a black dog chases a small brown cat", "stock photo 123", "a man rides a red bicycle",
                "a woman holds an umbrella in the rain"]
    urls = [server.url(f"/img/{100 + 10 * i}x90/{i}.jpg") for i in range(8)] + [server.url("/status/404")] * 4
    lst = tmp_path / "cc3m.tsv"
    lst.write_text("".join(f"{captions[i % 4]}\t{u}\n" for i, u in enumerate(urls)))
    raw = deep_merge(tiny_params(), {
        "paths": {k: str(tmp_path / k) for k in ("data", "models", "metrics", "plots")},
        "download": {"source": "url_list", "url_list": {"path": str(lst), "shard_size": 4, "threads": 4,
                                                         "timeout": 2.0, "image_size": 64}},
        "cat_filter": {"workers": 1},
    })
    p = validate_params(raw)
    with pytest.raises(FileNotFoundError, match="download.url_list.path"):
        download.body(validate_params(deep_merge(raw, {"download": {"url_list": {"path": "nope.tsv"}}})), _Run())
    assert not (tmp_path / "data").exists()  # the error came before any work

    m = download.body(p, _Run())
    assert m["urls"] == 12 and m["train_samples"] == 8 and m["reasons"] == {"ok": 8, "http_404": 4}
    assert m["train_shards"] == 3 and m["teacher_samples"] == 160 and m["eval_samples"]
    raw_train = tmp_path / "data" / "raw" / "train"
    assert [s.name for s in shard_paths(raw_train)] == ["00000.tar", "00001.tar", "00002.tar"]  # the last is empty
    assert download.body(p, _Run())["resumed_shards"] == 3

    c = cat_filter.body(p, _Run())
    assert c["funnel"]["in"] == 8 and c["quality"] is None and c["drop_rate_by_noise"] == {}
    assert c["funnel"]["dropped_no_action"] >= 2  # "stock photo 123"
    assert c["funnel"]["kept"] >= 2
    decisions = pd.read_parquet(tmp_path / "data" / "cat" / "decisions.parquet")
    assert decisions.key.tolist() == [f"{i:09d}" for i in range(8)]


def test_an_unexpected_error_is_a_reason_too(server, monkeypatch):
    import diht_core.data.url_download as ud

    monkeypatch.setattr(ud, "resize", lambda *a: 1 / 0)
    sample, row = ud.download_one("000000000", server.url("/img/32x32/0.jpg"), "c", FAST)
    assert sample is None and row["reason"] == "error" and "ZeroDivisionError" in row["error_message"]


def test_redirects_into_private_addresses_or_other_schemes_are_refused(server):
    from urllib.parse import quote

    def to(target: str) -> str:
        return server.url("/to/" + quote(target, safe=""))

    strict = fast()  # allow_private: false, the default
    assert fetch(server.url("/img/32x32/0.jpg"), strict) == image_bytes(32, 32, 0)  # the list's own loopback URL
    unsafe = {
        server.url("/redirect/1/img/32x32/0.jpg"): "127.0.0.1",  # a redirect into loopback
        to("file:///etc/passwd"): "file", to("ftp://example.com/a.jpg"): "ftp",
        to("http://169.254.169.254/latest/meta-data/"): "169.254.169.254",  # cloud metadata: link-local
        to("http://10.1.2.3/a.jpg"): "10.1.2.3", to("http://[::1]/a.jpg"): "::1",
        to("http://localhost/a.jpg"): "localhost",
    }
    for url, what in unsafe.items():
        with pytest.raises(FetchError) as err:
            fetch(url, strict)
        assert err.value.reason == "unsafe_redirect" and err.value.attempts == 1, (url, err.value)
        assert what in err.value.message
    relaxed = fast(allow_private=True)
    assert fetch(server.url("/redirect/2/img/32x32/0.jpg"), relaxed) == image_bytes(32, 32, 0)
    for target in ("file:///etc/passwd", "ftp://example.com/a.jpg"):  # other schemes: never
        with pytest.raises(FetchError) as err:
            fetch(to(target), relaxed)
        assert err.value.reason == "unsafe_redirect"


@pytest.mark.parametrize("addr, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.0.0.1", False),
    ("172.16.5.4", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("::1", False), ("fe80::1%eth0", False), ("fd00::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True), ("203.0.113.7", False),
])
def test_public_address(addr, public):
    from diht_core.data.fetch import check_redirect, public_address

    assert public_address(addr) is public
    if public and ":" not in addr:  # an address literal resolves without the network
        check_redirect(f"http://{addr}/a.jpg", allow_private=False)


def test_sources_never_delete_each_others_training_split(server, tmp_path):
    """A synthetic download after a URL list's (and the other way round) is refused before anything is removed;
    the synthetic source clears only what it writes."""
    from diht_core.data.synthetic import SourceConflict, write_source
    from diht_core.data.url_download import download_source

    lst = tmp_path / "list.tsv"
    lst.write_text("".join(f"caption {i}\t{server.url(f'/img/40x30/{i}.jpg')}\n" for i in range(5)))
    p = validate_params(tiny_params())
    d_url = p.download.model_copy(update={"source": "url_list", "url_list": fast(path=str(lst), shard_size=2)})
    root = tmp_path / "data"
    (root / "eval" / "flickr30k").mkdir(parents=True)  # a real evaluation set beside the synthetic ones
    (root / "eval" / "flickr30k" / "karpathy.json").write_text("{}")
    m = download_source(d_url, 0, root)
    assert m["train_samples"] == 5 and (root / "eval" / "synthetic_shape").is_dir()
    train = root / "raw" / "train"

    def snapshot() -> dict:
        return {f.name: f.stat().st_mtime_ns for f in train.iterdir()}

    before = snapshot()
    with pytest.raises(SourceConflict, match="holds a URL list's download"):
        write_source(p.download, 0, root)
    assert snapshot() == before and (root / "raw" / "teacher").is_dir()  # nothing removed

    other = tmp_path / "other"
    (other / "eval" / "flickr30k").mkdir(parents=True)
    write_source(p.download.model_copy(update={"num_train": 64, "shard_size": 16}), 0, other)
    write_source(p.download.model_copy(update={"num_train": 32, "shard_size": 16}), 0, other)  # smaller: no stale
    assert sorted(f.name for f in (other / "raw" / "train").iterdir()) == ["0.tar", "1.tar", "nshards.txt"]
    assert (other / "eval" / "flickr30k").is_dir()  # not the synthetic source's: kept
    synth = {f.name: f.stat().st_mtime_ns for f in (other / "raw" / "train").iterdir()}
    with pytest.raises(SourceConflict, match="holds the synthetic training split"):
        download_source(d_url, 0, other)
    assert {f.name: f.stat().st_mtime_ns for f in (other / "raw" / "train").iterdir()} == synth
    assert (root / "eval" / "flickr30k" / "karpathy.json").read_text() == "{}"
