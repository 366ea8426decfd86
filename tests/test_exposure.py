"""Serving beyond loopback: warnings, a login, form paths confined to named folders, no paths in errors."""
import gradio as gr
import pytest

from workbench.config import QuantizeConfig
from workbench.errors import WorkbenchError
from workbench.ui import app as app_module
from workbench.ui.exposure import EXPOSURE, Exposure, exposure_warnings, is_loopback, parse_auth
from workbench.ui.form import build_form
from workbench.ui.views import error_text


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                       ("0.0.0.0", False), ("192.168.1.5", False), ("my-host", False)])
def test_loopback(host, loop):
    assert is_loopback(host) is loop


def test_warnings_for_a_public_host_or_a_share_link():
    assert exposure_warnings("127.0.0.1", False, False, ()) == []
    lines = exposure_warnings("0.0.0.0", False, False, ())
    assert "anyone who can reach" in lines[0] and "no --auth" in lines[0] and "none (no --allow-path" in lines[-1]
    assert any("gradio.live" in line for line in exposure_warnings("127.0.0.1", True, True, ()))
    assert "no --auth" not in exposure_warnings("0.0.0.0", False, True, ())[0]


def test_auth_pairs():
    assert parse_auth("alice:pa:ss") == ("alice", "pa:ss")
    for bad in ("alice", ":x", "alice:"):
        with pytest.raises(WorkbenchError, match="USER:PASSWORD"):
            parse_auth(bad)


def test_main_warns_and_passes_the_login_to_gradio(monkeypatch, tmp_path, caplog):
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(kw))
    monkeypatch.setattr(app_module, "EXPOSURE", Exposure())
    monkeypatch.delenv("WORKBENCH_AUTH", raising=False)
    with caplog.at_level("WARNING", logger="workbench.ui"):
        app_module.main(["--host", "0.0.0.0", "--auth", "alice:s3cret", "--no-preload", "--allow-path", str(tmp_path)])
    assert seen["auth"] == ("alice", "s3cret") and seen["server_name"] == "0.0.0.0"
    assert any("anyone who can reach" in r.message for r in caplog.records)
    assert app_module.EXPOSURE.public and app_module.EXPOSURE.roots == (tmp_path.resolve(),)
    with pytest.raises(SystemExit, match="USER:PASSWORD"):
        app_module.main(["--auth", "nopassword", "--no-preload"])


@pytest.fixture
def exposed(monkeypatch, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setattr(EXPOSURE, "public", True)
    monkeypatch.setattr(EXPOSURE, "roots", (allowed.resolve(),))
    return allowed


def test_form_paths_are_confined_to_the_allowed_folders(exposed, tmp_path, tiny_checkpoints):
    inside = exposed / "calib.txt"
    inside.write_text("some text")
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    with gr.Blocks():
        form = build_form({"device": "cpu"})
    names = list(form.fields)

    def config(**over):
        values = {n: form.fields[n].value for n in names}
        values.update(over)
        return form.config([values[n] for n in names], "gptq")
    assert config(calib=str(inside)).calib == str(inside)
    assert config(calib="wikitext2", model="smollm2-135m").model == "smollm2-135m"
    with pytest.raises(WorkbenchError, match="^Calibration text must lie under the folders the operator"):
        config(calib=str(outside))
    with pytest.raises(WorkbenchError, match="^Calibration text must lie under"):
        config(calib=str(exposed / ".." / "secret.txt"))           # no way out with ..
    with pytest.raises(WorkbenchError, match="^Evaluation text must lie under"):
        config(eval_text="/etc/hostname")
    with pytest.raises(WorkbenchError, match="^Model must lie under"):
        config(model=tiny_checkpoints["llama"])


def test_loopback_forms_take_any_path(tmp_path):
    assert Exposure().check(QuantizeConfig(calib="/etc/hostname")).calib == "/etc/hostname"


def test_errors_in_the_page_name_no_paths(exposed):
    text = error_text(WorkbenchError("text source '/home/alice/notes/secret.txt' is not a file; use a text file"))
    assert "/home" not in text and "secret" not in text and "'<path>' is not a file" in text
    boom = error_text(FileNotFoundError(2, "No such file", "/srv/data/x.bin"))
    assert "/srv" not in boom
    # numbers and settings with slashes survive
    assert "1/2 of hf:a/b" in error_text(WorkbenchError("1/2 of hf:a/b"))


def test_without_allowed_folders_no_path_is_taken(monkeypatch):
    monkeypatch.setattr(EXPOSURE, "public", True)
    monkeypatch.setattr(EXPOSURE, "roots", ())
    with pytest.raises(WorkbenchError, match="^Calibration text cannot be a file path on this server"):
        EXPOSURE.check(QuantizeConfig(calib="/etc/hostname"))
    assert EXPOSURE.check(QuantizeConfig(calib="wikitext2")).calib == "wikitext2"
