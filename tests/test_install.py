"""`make install`'s uv command takes pip's package sources as `pip install` would read them."""
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from uv_install_args import pip_config, uv_command  # noqa: E402


def test_uv_gets_the_sources_pip_install_reads():
    listing = "\n".join([
        ":env:.find-links='/opt/wheels'",
        ":env:.index-url='https://env/simple'",           # PIP_INDEX_URL replaces the files' value
        "download.index-url='https://download/simple'",   # another command's section: not read by pip install
        "global.extra-index-url='\\nhttps://a/simple\\nhttps://b/simple'",  # a value over several lines
        "global.index-url='https://global/simple'",
        "global.cert='/etc/ca.crt'",
        "install.index-url='https://install/simple'",
        "install.no-index='false'",
    ])
    config = pip_config(listing)
    assert config["index-url"] == ["https://env/simple"]
    assert config["extra-index-url"] == ["https://a/simple", "https://b/simple"]
    cmd, env = uv_command(config, ["-e", "."])
    assert cmd[1:] == ["pip", "install", "--index-strategy", "unsafe-best-match", "--index-url", "https://env/simple",
                       "--extra-index-url", "https://a/simple", "--extra-index-url", "https://b/simple",
                       "--find-links", "/opt/wheels", "-e", "."]
    assert env == {"SSL_CERT_FILE": "/etc/ca.crt"}
    assert "--no-index" in uv_command(pip_config("install.no-index='true'"), [])[0]
