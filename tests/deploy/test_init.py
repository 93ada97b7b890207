"""`tp init` and the packaged deployment files: one copy of each, the layout in the modes `tp check`
wants, an env file never overwritten, a unit systemd accepts, and `tp`'s own settings files."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import telegram_platform
from telegram_platform.cli.tp import load_deployment_env
from telegram_platform.settings import EXIT_CONFIG

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "telegram_platform" / "deploy"
TP = [sys.executable, "-m", "telegram_platform.cli.tp"]


def tp_init(prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TP, "init", "--prefix", str(prefix), *args], capture_output=True, text=True, timeout=60,
                          check=False)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def env_values(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def test_init_lays_out_a_host_in_the_modes_tp_check_wants(tmp_path: Path) -> None:
    """Configuration, data, logs and run directories under the prefix, private where `tp check` wants
    them private; the env file 0600 with strong generated secrets (the metrics token too), the layout's
    paths and the API on loopback."""
    result = tp_init(tmp_path, "--database-url", "postgresql://tp@db.internal/tp", "--redis-url",
                     "redis://redis.internal:6379/0")
    assert result.returncode == 0, result.stderr
    etc = tmp_path / "etc/telegram-platform"
    expected = {etc: 0o750, etc / "env": 0o600, etc / "supervisord.conf": 0o640,
                tmp_path / "var/lib/telegram-platform": 0o700, tmp_path / "var/lib/telegram-platform/tdlib": 0o700,
                tmp_path / "var/log/telegram-platform": 0o750, tmp_path / "run/telegram-platform": 0o700,
                tmp_path / "run/telegram-platform/metrics": 0o700}
    assert {path: mode(path) for path in expected} == expected
    values = env_values(etc / "env")
    assert values["TP_PROFILE"] == "production"
    assert values["DATABASE_URL"] == "postgresql://tp@db.internal/tp"
    assert len(values["JWT_SECRET"]) >= 64 and len(bytes.fromhex(values["ENCRYPTION_KEY"])) == 32
    # Production refuses an open /metrics and listens on loopback, behind its reverse proxy.
    assert len(bytes.fromhex(values["TP_METRICS_TOKEN"])) == 32
    assert (values["TP_HOST"], values["TP_TRUSTED_PROXIES"]) == ("127.0.0.1", "127.0.0.1")
    assert values["TP_API_PROCESSES"] == "max"
    assert values["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "run/telegram-platform/metrics")
    assert values["TP_SUPERVISORD_CONF"] == str(etc / "supervisord.conf")
    assert values["TDLIB_DATA_DIR"] == str(tmp_path / "var/lib/telegram-platform/tdlib")
    conf = (etc / "supervisord.conf").read_text()
    assert not [line for line in conf.splitlines() if "%(here)s" in line and not line.startswith(";")]
    assert f"childlogdir={tmp_path}/var/log/telegram-platform" in conf
    assert f"file={tmp_path}/run/telegram-platform/supervisor.sock" in conf
    assert {p.name for p in (etc / "prometheus").iterdir()} == {"alerts.yml", "prometheus.yml",
                                                                "grafana-dashboard.json"}
    assert [p.name for p in (etc / "nginx").iterdir()] == ["telegram-platform.conf"]
    unit = (tmp_path / "etc/systemd/system/telegram-platform.service").read_text()
    assert f"ExecStart={Path(sys.executable).parent}/tp supervise" in unit
    assert "RuntimeDirectory" not in unit  # a --prefix run directory is not /run/telegram-platform
    assert "/opt/telegram-platform" not in unit and "RestartPreventExitStatus=78" in unit


def test_init_never_overwrites_the_env_file(tmp_path: Path) -> None:
    """A second `tp init` refuses (the env file holds the secrets); --keep-env writes the rest again."""
    assert tp_init(tmp_path).returncode == 0
    env = tmp_path / "etc/telegram-platform/env"
    conf = tmp_path / "etc/telegram-platform/supervisord.conf"
    before = env.read_text()
    conf.write_text("; edited\n")
    again = tp_init(tmp_path)
    assert again.returncode == 1 and "never overwritten" in again.stderr
    assert env.read_text() == before and conf.read_text() == "; edited\n"
    upgrade = tp_init(tmp_path, "--keep-env")
    assert upgrade.returncode == 0, upgrade.stderr
    assert env.read_text() == before and "[fcgi-program:tp-api]" in conf.read_text()


def test_init_refuses_invalid_values_as_a_configuration_error(tmp_path: Path) -> None:
    """A malformed key is named (never echoed) and exits 78, EX_CONFIG, before anything is written."""
    result = tp_init(tmp_path, "--encryption-key", "not-hex-secret")
    assert result.returncode == EXIT_CONFIG
    assert "ENCRYPTION_KEY" in result.stderr and "not-hex-secret" not in result.stderr
    assert not (tmp_path / "etc").exists()
    result = tp_init(tmp_path, "--api-processes", "lots")
    assert result.returncode == EXIT_CONFIG and "TP_API_PROCESSES" in result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_generated_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit `tp init` writes for this installation."""
    assert tp_init(tmp_path).returncode == 0
    unit = tmp_path / "etc/systemd/system/telegram-platform.service"
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                            check=False,
                            env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_clone_uses_the_packaged_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The clone's supervisord.conf and systemd/ files are links to the packaged ones, and supervisord
    still takes %(here)s from the clone (it does not resolve the link)."""
    from supervisor.options import ServerOptions

    for link, target in (("supervisord.conf", "supervisord.conf"),
                         ("systemd/telegram-platform.service", "telegram-platform.service"),
                         ("systemd/telegram-platform.env.example", "telegram-platform.env.example")):
        assert (REPO / link).is_symlink() and (REPO / link).resolve() == DEPLOY / target, link
    clone = tmp_path / "clone"  # the same arrangement, with the var/ directories scripts/run makes
    (clone / "telegram_platform/deploy").mkdir(parents=True)
    shutil.copy(DEPLOY / "supervisord.conf", clone / "telegram_platform/deploy/supervisord.conf")
    (clone / "supervisord.conf").symlink_to(os.readlink(REPO / "supervisord.conf"))
    for sub in ("var/log", "var/run"):
        (clone / sub).mkdir(parents=True)
    for name, value in (("PORT", "3000"), ("TP_HOST", "127.0.0.1"), ("TP_API_PROCESSES", "2")):
        monkeypatch.setenv(name, value)
    options = ServerOptions()
    options.realize(args=["-c", str(clone / "supervisord.conf")])
    assert options.server_configs[0]["file"] == str(clone / "var/run/supervisor.sock")
    assert options.childlogdir == str(clone / "var/log")


def test_tp_reads_its_own_clones_settings_not_the_working_directorys(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """var/run/tp.env in whatever directory `tp` runs from is not read (only its own clone's is)."""
    (tmp_path / "var/run").mkdir(parents=True)
    (tmp_path / "var/run/tp.env").write_text("export TP_REHEARSAL_MARKER=cwd\n")
    monkeypatch.chdir(tmp_path)
    environ: dict[str, str] = {}
    found = load_deployment_env(environ)
    assert found != Path("var/run/tp.env") and found != tmp_path / "var/run/tp.env"
    assert "TP_REHEARSAL_MARKER" not in environ


def test_env_file_fills_what_the_environment_lacks(tmp_path: Path) -> None:
    """`tp --env-file FILE` reads the unit's KEY=value file; what the environment sets wins."""
    env_file = tmp_path / "env"
    env_file.write_text("# comment\nPORT=3000\nDATABASE_URL=postgresql://tp@db/tp\nTDLIB_API_ID=\n")
    environ = {"PORT": "4000"}
    assert load_deployment_env(environ, env_file=env_file) == env_file
    assert environ == {"PORT": "4000", "DATABASE_URL": "postgresql://tp@db/tp", "TDLIB_API_ID": ""}
    missing = subprocess.run([*TP, "--env-file", str(tmp_path / "nowhere"), "status"], capture_output=True,
                             text=True, timeout=60, check=False)
    assert missing.returncode == EXIT_CONFIG and "cannot read" in missing.stderr


@pytest.mark.parametrize("script", ["tp", "tp-api", "tp-worker", "tp-emulator", "tp-events"])
def test_every_console_script_answers_version(script: str) -> None:
    """`--version` prints the package's, TDLib's and Python's versions on stdout and exits 0."""
    result = subprocess.run([str(Path(sys.executable).parent / script), "--version"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{script} (telegram-platform) {telegram_platform.__version__}, TDLib ")
