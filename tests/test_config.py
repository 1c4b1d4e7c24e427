"""flexkv_core.config: sources and precedence, parsing, error messages, machine checks, round trips, CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flexkv_core import config as config_mod
from flexkv_core.config import (
    FOREIGN_ENV,
    ConfigError,
    EvictionPolicy,
    FlexKVConfig,
    GiB,
    configure_logging,
    explain_config,
    format_bytes,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]


def load(env: dict[str, str]) -> FlexKVConfig:
    return load_config(env, check_resources=False)


def sources(env: dict[str, str]) -> dict[str, str]:
    return {key: source for key, _value, source in explain_config(env)}


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ---------------------------------------------------------------- defaults and types


def test_defaults_are_the_documented_ones():
    cfg = load({})
    assert cfg == FlexKVConfig()
    assert cfg.enable is True
    assert cfg.cpu_cache_gb == 16.0 and cfg.cpu_cache_bytes == 16 * GiB
    assert cfg.ssd_cache_gb == 0.0 and cfg.ssd_cache_bytes == 0 and not cfg.ssd_enabled
    assert cfg.ssd_cache_dir == ("/tmp/flexkv_ssd",)
    assert cfg.server_recv_port == "ipc:///tmp/flexkv_server"
    assert cfg.share_server is False
    assert cfg.eviction_policy is EvictionPolicy.LRU
    assert (cfg.evict_ratio, cfg.evict_start_threshold, cfg.hit_reward_seconds) == (0.05, 1.0, 0.0)
    assert cfg.max_file_size_gb == 32.0 and cfg.max_file_bytes == 32 * GiB
    assert cfg.ssd_io_threads == 4
    assert cfg.log_level == "INFO"
    assert cfg.enable_metrics is True and cfg.metrics_port == 0
    assert (cfg.instance_num, cfg.instance_id) == (1, 0)
    assert set(sources({}).values()) == {"default"}


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("On", True), (" on ", True),
    ("false", False), ("0", False), ("NO", False), ("off", False),
])
def test_env_booleans(text, expected):
    cfg = load({"FLEXKV_SHARE_SERVER": text, "ENABLE_FLEXKV": text, "FLEXKV_ENABLE_METRICS": text})
    assert cfg.share_server is expected and cfg.enable is expected and cfg.enable_metrics is expected


def test_env_values_of_every_type(tmp_path):
    env = {
        "FLEXKV_CPU_CACHE_GB": "0.5",
        "FLEXKV_SSD_CACHE_GB": "2e1",
        "FLEXKV_SSD_CACHE_DIR": f" {tmp_path}/a ; {tmp_path}/b;",
        "FLEXKV_SERVER_RECV_PORT": "tcp://127.0.0.1:5555",
        "FLEXKV_EVICTION_POLICY": "SLRU",
        "FLEXKV_EVICT_RATIO": "1",
        "FLEXKV_EVICT_START_THRESHOLD": ".9",
        "FLEXKV_HIT_REWARD_SECONDS": "+3",
        "FLEXKV_MAX_FILE_SIZE_GB": "0.25",
        "FLEXKV_SSD_IO_THREADS": "16",
        "FLEXKV_LOG_LEVEL": "debug",
        "FLEXKV_INSTANCE_NUM": "4",
        "FLEXKV_INSTANCE_ID": "3",
    }
    cfg = load(env)
    assert cfg.cpu_cache_gb == 0.5 and cfg.cpu_cache_bytes == GiB // 2
    assert cfg.ssd_cache_gb == 20.0 and cfg.ssd_enabled
    assert cfg.ssd_cache_dir == (f"{tmp_path}/a", f"{tmp_path}/b")
    assert cfg.server_recv_port == "tcp://127.0.0.1:5555"
    assert cfg.eviction_policy is EvictionPolicy.SLRU
    assert (cfg.evict_ratio, cfg.evict_start_threshold, cfg.hit_reward_seconds) == (1.0, 0.9, 3.0)
    assert cfg.max_file_bytes == GiB // 4
    assert cfg.ssd_io_threads == 16 and isinstance(cfg.ssd_io_threads, int)
    assert cfg.log_level == "DEBUG"
    assert (cfg.instance_num, cfg.instance_id) == (4, 3)
    assert sources(env)["cpu_cache_gb"] == "env FLEXKV_CPU_CACHE_GB"
    assert sources(env)["ssd_io_threads"] == "env FLEXKV_SSD_IO_THREADS"
    assert sources(env)["enable_flexkv"] == "default"


def test_relative_ssd_dirs_become_absolute(tmp_path, monkeypatch):
    # A child process started elsewhere must mean the same directories.
    monkeypatch.chdir(tmp_path)
    cfg = load({"FLEXKV_SSD_CACHE_DIR": "ssd0;~/ssd1"})
    assert cfg.ssd_cache_dir == (str(tmp_path / "ssd0"), os.path.expanduser("~/ssd1"))


# ---------------------------------------------------------------- the file, and precedence


def test_yaml_file_overrides_env_and_sources_say_so(tmp_path, caplog):
    path = write_yaml(tmp_path / "flexkv.yaml", {
        "cpu_cache_gb": 2, "ssd_cache_gb": 1.5, "ssd_cache_dir": [str(tmp_path / "x"), str(tmp_path / "y")],
        "eviction_policy": "lfu", "enable_flexkv": False, "share_server": True,
    })
    env = {"FLEXKV_CONFIG_PATH": path, "FLEXKV_CPU_CACHE_GB": "8", "FLEXKV_SSD_IO_THREADS": "2",
           "ENABLE_FLEXKV": "1"}
    with caplog.at_level(logging.WARNING, logger="flexkv_core.config"):
        cfg = load(env)
    assert cfg.cpu_cache_gb == 2.0  # file beats env
    assert cfg.ssd_io_threads == 2  # env beats default
    assert cfg.ssd_cache_dir == (str(tmp_path / "x"), str(tmp_path / "y"))
    assert cfg.eviction_policy is EvictionPolicy.LFU and cfg.enable is False and cfg.share_server is True
    src = sources(env)
    assert src["cpu_cache_gb"] == f"file {path}"
    assert src["enable_flexkv"] == f"file {path}"
    assert src["ssd_io_threads"] == "env FLEXKV_SSD_IO_THREADS"
    assert src["log_level"] == "default"
    # The ignored variables are named, so nobody wonders why their setting has no effect.
    assert "FLEXKV_CPU_CACHE_GB='8' is ignored" in caplog.text and "ENABLE_FLEXKV" in caplog.text


@pytest.mark.parametrize("name", ["flexkv.json", "flexkv.conf"])  # .conf: no telling suffix, sniffed
def test_json_file(tmp_path, name):
    path = tmp_path / name
    path.write_text(json.dumps({"cpu_cache_gb": 3.5, "ssd_cache_dir": f"{tmp_path}/p;{tmp_path}/q",
                                "log_level": "warning"}))
    cfg = load({"FLEXKV_CONFIG_PATH": str(path), "FLEXKV_LOG_LEVEL": "ERROR"})
    assert cfg.cpu_cache_gb == 3.5 and cfg.log_level == "WARNING"
    assert cfg.ssd_cache_dir == (f"{tmp_path}/p", f"{tmp_path}/q")


def test_yml_file_with_yaml_quirks(tmp_path):
    # PyYAML reads `1e3` (no dot) as a string; numbers written as text are still numbers.
    path = tmp_path / "c.yml"
    path.write_text("cpu_cache_gb: 1e1\nssd_io_threads: '8'\n")
    cfg = load({"FLEXKV_CONFIG_PATH": str(path)})
    assert cfg.cpu_cache_gb == 10.0 and cfg.ssd_io_threads == 8


def test_empty_config_path_means_no_file():
    assert load({"FLEXKV_CONFIG_PATH": ""}) == FlexKVConfig()


# ---------------------------------------------------------------- errors name key, value, source, allowed


@pytest.mark.parametrize("var, value, key, allowed", [
    ("FLEXKV_CPU_CACHE_GB", "abc", "cpu_cache_gb", "a number > 0"),
    ("FLEXKV_CPU_CACHE_GB", "nan", "cpu_cache_gb", "a number > 0"),
    ("FLEXKV_CPU_CACHE_GB", "inf", "cpu_cache_gb", "a number > 0"),
    ("FLEXKV_CPU_CACHE_GB", "-1", "cpu_cache_gb", "a number > 0"),
    ("FLEXKV_CPU_CACHE_GB", "0", "cpu_cache_gb", "a number > 0"),
    ("FLEXKV_CPU_CACHE_GB", "1_000", "cpu_cache_gb", "a number > 0"),
    ("FLEXKV_SSD_CACHE_GB", "-0.5", "ssd_cache_gb", "a number >= 0"),
    ("FLEXKV_MAX_FILE_SIZE_GB", "0", "max_file_size_gb", "a number > 0"),
    ("FLEXKV_EVICT_RATIO", "0", "evict_ratio", "a number in (0, 1]"),
    ("FLEXKV_EVICT_RATIO", "1.5", "evict_ratio", "a number in (0, 1]"),
    ("FLEXKV_EVICT_START_THRESHOLD", "-0.1", "evict_start_threshold", "a number in (0, 1]"),
    ("FLEXKV_HIT_REWARD_SECONDS", "-3", "hit_reward_seconds", "a number >= 0"),
    ("FLEXKV_SSD_IO_THREADS", "4.5", "ssd_io_threads", "an integer >= 1"),
    ("FLEXKV_SSD_IO_THREADS", "0", "ssd_io_threads", "an integer >= 1"),
    ("FLEXKV_INSTANCE_NUM", "two", "instance_num", "an integer >= 1"),
    ("FLEXKV_INSTANCE_ID", "1", "instance_id", "an integer in [0, 0]"),
    ("FLEXKV_SHARE_SERVER", "maybe", "share_server", "true or false"),
    ("ENABLE_FLEXKV", "2", "enable_flexkv", "true or false"),
    ("FLEXKV_EVICTION_POLICY", "random", "eviction_policy", "lru, lfu, fifo, mru, filo, slru"),
    ("FLEXKV_LOG_LEVEL", "verbose", "log_level", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("FLEXKV_SERVER_RECV_PORT", "http://host:80", "server_recv_port", "ipc://PATH"),
    ("FLEXKV_SERVER_RECV_PORT", "tcp://host:http", "server_recv_port", "tcp://HOST:PORT"),
    ("FLEXKV_SERVER_RECV_PORT", "tcp://host:70000", "server_recv_port", "PORT in 1..65535"),
    ("FLEXKV_SERVER_RECV_PORT", "tcp://:5555", "server_recv_port", "tcp://HOST:PORT"),
    ("FLEXKV_SERVER_RECV_PORT", "ipc:///tmp/" + "x" * 120, "server_recv_port", "at most 107 bytes"),
    ("FLEXKV_SSD_CACHE_DIR", "/a;/b;/a", "ssd_cache_dir", "directories"),
    ("FLEXKV_METRICS_PORT", "70000", "metrics_port", "an integer in [0, 65535]"),
])
def test_bad_env_value_is_named(var, value, key, allowed):
    with pytest.raises(ConfigError) as info:
        load({var: value})
    msg = str(info.value)
    assert f"{key}={value!r}" in msg
    assert f"env {var}" in msg
    assert allowed in msg
    assert info.value.key == key


def test_bad_file_value_is_named(tmp_path):
    path = write_yaml(tmp_path / "f.yaml", {"evict_ratio": 2})
    with pytest.raises(ConfigError, match=r"evict_ratio=2 from file .*f\.yaml.*allowed: a number in \(0, 1\]"):
        load({"FLEXKV_CONFIG_PATH": path})


@pytest.mark.parametrize("key, value, problem", [
    ("share_server", "yes", "expected a boolean"),  # files hold real booleans
    ("ssd_io_threads", True, "expected an integer"),  # bool is an int in Python, not here
    ("ssd_io_threads", 2.0, "expected an integer"),
    ("cpu_cache_gb", [1], "expected a number"),
    ("ssd_cache_dir", [""], "non-empty path"),
    ("ssd_cache_dir", 5, "expected a list"),
])
def test_file_values_are_typed(tmp_path, key, value, problem):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(ConfigError) as info:
        load({"FLEXKV_CONFIG_PATH": str(path)})
    assert f"{key}={value!r} from file {path}" in str(info.value)
    assert problem in str(info.value) and "allowed:" in str(info.value)


def test_ssd_size_without_a_directory(tmp_path):
    with pytest.raises(ConfigError) as info:
        load({"FLEXKV_SSD_CACHE_GB": "1", "FLEXKV_SSD_CACHE_DIR": " ; "})
    msg = str(info.value)
    assert "ssd_cache_dir=' ; ' from env FLEXKV_SSD_CACHE_DIR" in msg
    assert "ssd_cache_gb=1 (env FLEXKV_SSD_CACHE_GB)" in msg and "at least one directory" in msg
    # Without an SSD tier, an empty list is harmless.
    assert load({"FLEXKV_SSD_CACHE_DIR": ""}).ssd_cache_dir == ()


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=rf"FLEXKV_CONFIG_PATH='{missing}': cannot read .*No such file"):
        load({"FLEXKV_CONFIG_PATH": missing})


@pytest.mark.parametrize("name, text, problem", [
    ("bad.yaml", "cpu_cache_gb: [1\n", "cannot parse"),
    ("bad.json", '{"cpu_cache_gb": 1,}', "cannot parse"),
    ("bad.conf", "cpu_cache_gb: {{{\n", "cannot parse"),
    ("list.yaml", "- cpu_cache_gb\n", "must hold a mapping"),
])
def test_unparsable_config_file(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load({"FLEXKV_CONFIG_PATH": str(path)})
    assert str(path) in str(info.value) and problem in str(info.value)


def test_unknown_env_variable_suggests_the_closest():
    with pytest.raises(ConfigError) as info:
        load({"FLEXKV_CPU_CACHE_G": "8", "FLEXKV_EVICTION_POLICI": "lru"})
    msg = str(info.value)
    assert "FLEXKV_CPU_CACHE_G='8' (did you mean FLEXKV_CPU_CACHE_GB?)" in msg
    assert "FLEXKV_EVICTION_POLICI='lru' (did you mean FLEXKV_EVICTION_POLICY?)" in msg
    with pytest.raises(ConfigError, match="FLEXKV_ZZZZ='1' .*known: ENABLE_FLEXKV, FLEXKV_CPU_CACHE_GB"):
        load({"FLEXKV_ZZZZ": "1"})


def test_foreign_env_variables_are_allowed_and_others_ignored():
    assert "FLEXKV_CONFIG_PATH" in FOREIGN_ENV
    cfg = load({"FLEXKV_CONFIG_PATH": "", "PATH": "/bin", "VLLM_FLEXKV": "x", "flexkv_lowercase": "y"})
    assert cfg == FlexKVConfig()


@pytest.mark.parametrize("bad_key, suggestion", [
    ("cpu_cach_gb", "cpu_cache_gb"),
    ("FLEXKV_SSD_CACHE_GB", "ssd_cache_gb"),  # an env name used as a file key
    ("enable", "enable_flexkv"),
])
def test_unknown_file_key_suggests_the_closest(tmp_path, bad_key, suggestion):
    path = write_yaml(tmp_path / "c.yaml", {bad_key: 1})
    with pytest.raises(ConfigError) as info:
        load({"FLEXKV_CONFIG_PATH": path})
    assert f"config file {path}: unknown key {bad_key}=1 (did you mean {suggestion}?)" in str(info.value)


# ---------------------------------------------------------------- checks against this machine


def test_cpu_cache_bigger_than_the_machine():
    machine_gb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    with pytest.raises(ConfigError) as info:
        load_config({"FLEXKV_CPU_CACHE_GB": str(round(machine_gb * 2))})
    msg = str(info.value)
    assert f"cpu_cache_gb={round(machine_gb * 2)} from env FLEXKV_CPU_CACHE_GB" in msg
    assert "memory" in msg and "at most" in msg
    # A disabled cache allocates nothing: no reason to refuse it.
    load_config({"FLEXKV_CPU_CACHE_GB": str(round(machine_gb * 2)), "ENABLE_FLEXKV": "0"})


def test_ssd_dirs_are_created_and_probed(tmp_path):
    dirs = [tmp_path / "ssd" / "a", tmp_path / "ssd" / "b"]
    cfg = load_config({"FLEXKV_CPU_CACHE_GB": "0.01", "FLEXKV_SSD_CACHE_GB": "0.01",
                       "FLEXKV_SSD_CACHE_DIR": ";".join(map(str, dirs))})
    assert cfg.ssd_cache_dir == tuple(map(str, dirs))
    assert all(d.is_dir() and list(d.iterdir()) == [] for d in dirs)  # probe file removed


@pytest.mark.parametrize("make_bad", [
    lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "sub",  # parent is a regular file
    lambda tmp: (tmp / "file").write_text("x") and tmp / "file",  # the "dir" is a regular file
])
def test_ssd_dir_that_cannot_be_written(tmp_path, make_bad):
    # Tests run as root, so chmod cannot make a directory unwritable; a path under a file cannot exist.
    bad = make_bad(tmp_path)
    good = tmp_path / "good"
    with pytest.raises(ConfigError) as info:
        load_config({"FLEXKV_CPU_CACHE_GB": "0.01", "FLEXKV_SSD_CACHE_GB": "0.01",
                     "FLEXKV_SSD_CACHE_DIR": f"{good};{bad}"})
    msg = str(info.value)
    assert f"ssd_cache_dir='{bad}' from env FLEXKV_SSD_CACHE_DIR" in msg
    assert "cannot create or write" in msg and "allowed: directories" in msg


def test_ssd_not_enough_space(tmp_path):
    env = {"FLEXKV_CPU_CACHE_GB": "0.01", "FLEXKV_SSD_CACHE_GB": str(10**6),
           "FLEXKV_SSD_CACHE_DIR": str(tmp_path / "ssd")}
    with pytest.raises(ConfigError) as info:
        load_config(env)
    msg = str(info.value)
    assert "ssd_cache_gb=1000000 from env FLEXKV_SSD_CACHE_GB: only" in msg and "GiB available" in msg
    assert str(tmp_path / "ssd") in msg and "at most" in msg
    load_config(env, check_resources=False)  # the values themselves are fine


def test_dirs_on_one_filesystem_share_its_free_space(tmp_path):
    # Two directories on one disk do not have twice its free space.
    a, b = tmp_path / "a", tmp_path / "b"
    free_gb = shutil.disk_usage(tmp_path).free / GiB
    with pytest.raises(ConfigError, match="ssd_cache_gb"):
        load_config({"FLEXKV_CPU_CACHE_GB": "0.01", "FLEXKV_SSD_CACHE_GB": str(free_gb * 1.5),
                     "FLEXKV_SSD_CACHE_DIR": f"{a};{b}"})


@pytest.mark.parametrize("n,shown", [
    (0, "0 B"), (512, "512 B"), (1024, "1.00 KiB"), (32 << 20, "32.0 MiB"), (int(1.5 * GiB), "1.50 GiB"),
    (150 * GiB, "150 GiB"), (5 << 40, "5.00 TiB"),
])
def test_sizes_are_shown_in_a_unit_that_keeps_their_digits(n, shown):
    assert format_bytes(n) == shown


def test_small_sizes_in_messages_are_not_rounded_to_zero_gib(tmp_path):
    """Issue: "only 0.0 GiB available" for 32 MiB. Our own 32 MiB file is reported as 32 MiB, and the
    limit quoted as allowed is the exact figure rounded down, never 0.0."""
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    with open(ssd / "flexkv_ssd_0.bin", "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, 32 << 20)
    with pytest.raises(ConfigError) as info:
        load_config({"FLEXKV_CPU_CACHE_GB": "0.01", "FLEXKV_SSD_CACHE_GB": str(10**6),
                     "FLEXKV_SSD_CACHE_DIR": str(ssd)})
    msg = str(info.value)
    assert "plus 32.0 MiB in existing flexkv_ssd_*.bin files" in msg, msg
    assert "0.0 GiB" not in msg
    at_most = float(re.search(r"at most ([0-9.]+) \(GiB\)", msg).group(1))
    free = shutil.disk_usage(ssd).free + (32 << 20)
    assert 0.99 * free <= at_most * GiB <= free  # rounded down, three significant digits


def test_cpu_tier_must_fit_in_dev_shm(monkeypatch, tmp_path):
    """The CPU tier is a /dev/shm file: a tmpfs too small for it is refused before anything is created
    (a container's 64 MiB default would otherwise SIGBUS the engine once the model has loaded)."""
    env = {"FLEXKV_CPU_CACHE_GB": "0.0625"}
    load_config(env)  # this machine's /dev/shm holds 64 MiB
    monkeypatch.setattr(config_mod, "SHM_DIR", str(tmp_path / "no_shm"))  # a missing tmpfs: 0 bytes free
    with pytest.raises(ConfigError) as info:
        load_config(env)
    msg = str(info.value)
    assert info.value.key == "cpu_cache_gb"
    assert f"cpu_cache_gb=0.0625 from env FLEXKV_CPU_CACHE_GB: {tmp_path / 'no_shm'} has only 0 B free" in msg, msg
    assert "--shm-size" in msg


def test_warm_restart_counts_our_own_files_as_available(tmp_path):
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    size = 256 << 20
    ours = ssd / "flexkv_ssd_0.bin"
    with open(ours, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, size)
    # Ask for half a file more than is free: only possible by reusing the file's space. The margin of
    # half a file absorbs other processes writing to this disk meanwhile.
    wanted_gb = (shutil.disk_usage(ssd).free + size // 2) / GiB
    env = {"FLEXKV_CPU_CACHE_GB": "0.01", "FLEXKV_SSD_CACHE_GB": repr(wanted_gb), "FLEXKV_SSD_CACHE_DIR": str(ssd)}
    assert load_config(env).ssd_cache_gb == wanted_gb

    ours.rename(ssd / "someone_elses.bin")  # not ours: its space is not ours to reuse
    with pytest.raises(ConfigError, match="ssd_cache_gb=.* from env FLEXKV_SSD_CACHE_GB: only"):
        load_config(env)


# ---------------------------------------------------------------- round trips, immutability


def odd_config(tmp_path) -> FlexKVConfig:
    return FlexKVConfig(enable=False, cpu_cache_gb=1.25, ssd_cache_gb=3, ssd_cache_dir=[str(tmp_path / "s")],
                        server_recv_port="tcp://*:6000", share_server=True, eviction_policy="filo",
                        evict_ratio=0.5, evict_start_threshold=0.8, hit_reward_seconds=2, max_file_size_gb=1,
                        ssd_io_threads=8, log_level="error", enable_metrics=False, instance_num=3,
                        instance_id=2)


def test_constructor_normalises_and_validates(tmp_path):
    cfg = odd_config(tmp_path)
    assert cfg.ssd_cache_dir == (str(tmp_path / "s"),)
    assert cfg.eviction_policy is EvictionPolicy.FILO and cfg.log_level == "ERROR"
    assert isinstance(cfg.ssd_cache_gb, float)
    with pytest.raises(ConfigError, match=r"ssd_io_threads=0 from argument ssd_io_threads: .*an integer >= 1"):
        FlexKVConfig(ssd_io_threads=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cpu_cache_gb = 2  # type: ignore[misc]


def test_round_trip_dict_json_and_pickle(tmp_path):
    cfg = odd_config(tmp_path)
    d = cfg.to_dict()
    assert d["eviction_policy"] == "filo" and d["ssd_cache_dir"] == [str(tmp_path / "s")]
    assert FlexKVConfig.from_dict(d) == cfg
    assert FlexKVConfig.from_dict(json.loads(json.dumps(d))) == cfg  # e.g. passed to a child as JSON
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert FlexKVConfig.from_dict({"cpu_cache_gb": 2}) == FlexKVConfig(cpu_cache_gb=2)


def test_from_dict_and_replace_validate():
    with pytest.raises(ConfigError, match=r"evict_ratio=0 from from_dict: .*\(0, 1\]"):
        FlexKVConfig.from_dict({"evict_ratio": 0})
    with pytest.raises(ConfigError, match=r"unknown field cpu_cach_gb=1 \(did you mean cpu_cache_gb\?\)"):
        FlexKVConfig.from_dict({"cpu_cach_gb": 1})
    cfg = FlexKVConfig()
    assert cfg.replace(cpu_cache_gb=0.5, eviction_policy="lfu") == FlexKVConfig(cpu_cache_gb=0.5,
                                                                                 eviction_policy="lfu")
    assert cfg.cpu_cache_gb == 16.0  # the original is untouched
    with pytest.raises(ConfigError, match=r"instance_id=5 from replace\(instance_id=...\): must be < instance_num=1"):
        cfg.replace(instance_id=5)
    with pytest.raises(ConfigError, match=r"did you mean ssd_io_threads\?"):
        cfg.replace(ssd_io_thread=3)


# ---------------------------------------------------------------- logging


@pytest.fixture
def clean_project_loggers():
    """Our loggers with no handlers; the test empties the root logger itself with `no_root_handlers`
    (pytest installs its capture handlers on it after fixtures are set up)."""
    saved = {}
    for name in ("flexkv_core", "flexkv_dynamo"):
        log = logging.getLogger(name)
        saved[name] = (log.level, list(log.handlers))
        log.handlers = []
    yield
    for name, (level, handlers) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).handlers = handlers


def no_root_handlers(monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])


def test_configure_logging_adds_one_handler(clean_project_loggers, monkeypatch):
    no_root_handlers(monkeypatch)
    configure_logging(FlexKVConfig(log_level="debug"))
    configure_logging(FlexKVConfig(log_level="warning"))  # again: no second handler
    for name in ("flexkv_core", "flexkv_dynamo"):
        log = logging.getLogger(name)
        assert log.level == logging.WARNING
        assert len(log.handlers) == 1
        assert log.handlers[0].formatter._fmt == "%(asctime)s %(levelname)s %(name)s: %(message)s"


def test_configure_logging_keeps_the_hosts_handlers(clean_project_loggers, monkeypatch):
    no_root_handlers(monkeypatch)
    host = logging.StreamHandler()
    logging.getLogger("flexkv_dynamo").addHandler(host)  # the host configured one of our loggers
    configure_logging(FlexKVConfig(log_level="debug"))
    assert logging.getLogger("flexkv_dynamo").handlers == [host]
    assert logging.getLogger("flexkv_dynamo").level == logging.DEBUG
    assert len(logging.getLogger("flexkv_core").handlers) == 1  # nobody handles this one: we do

    logging.getLogger("flexkv_core").handlers = []
    logging.getLogger().addHandler(logging.NullHandler())  # the host configured the root logger
    configure_logging(FlexKVConfig(log_level="error"))
    assert logging.getLogger("flexkv_dynamo").handlers == [host]
    assert logging.getLogger("flexkv_core").handlers == []  # propagates to the host's root handler
    assert logging.getLogger("flexkv_core").level == logging.ERROR


# ---------------------------------------------------------------- CLI


def run_cli(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXKV_") and k != "ENABLE_FLEXKV"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "flexkv_core.config", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_prints_values_and_sources(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"cpu_cache_gb": 0.5})
    out = run_cli({"FLEXKV_CONFIG_PATH": path, "FLEXKV_EVICTION_POLICY": "LFU", "FLEXKV_SSD_CACHE_DIR": "/a;/b"},
                  "--no-check")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()}
    assert rows["key"] == ["key", "value", "source"]
    assert rows["cpu_cache_gb"] == ["cpu_cache_gb", "0.5", "file", path]
    assert rows["eviction_policy"] == ["eviction_policy", "lfu", "env", "FLEXKV_EVICTION_POLICY"]
    assert rows["ssd_cache_dir"] == ["ssd_cache_dir", "/a;/b", "env", "FLEXKV_SSD_CACHE_DIR"]
    assert rows["ssd_io_threads"] == ["ssd_io_threads", "4", "default"]
    # Aligned: the value and source columns start at the same offset on every line.
    starts = {tuple(m.start() for m in re.finditer(r"(?<=\s)\S+", line))[:2] for line in out.stdout.splitlines()}
    assert len(starts) == 1

    out = run_cli({"FLEXKV_CPU_CACHE_GB": "0.5"}, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["cpu_cache_gb"] == {"value": 0.5, "source": "env FLEXKV_CPU_CACHE_GB"}
    assert doc["eviction_policy"] == {"value": "lru", "source": "default"}


def test_cli_exits_2_naming_the_bad_key():
    out = run_cli({"FLEXKV_EVICT_RATIO": "2"})
    assert out.returncode == 2
    assert out.stdout == ""
    assert "evict_ratio='2' from env FLEXKV_EVICT_RATIO" in out.stderr and "(0, 1]" in out.stderr

    out = run_cli({"FLEXKV_CPU_CACHE_GB": "100000"})  # the machine check runs unless --no-check
    assert out.returncode == 2 and "cpu_cache_gb=100000" in out.stderr
    assert run_cli({"FLEXKV_CPU_CACHE_GB": "100000"}, "--no-check").returncode == 0


def test_module_main_is_callable_in_process(capsys, monkeypatch):
    for name in [n for n in os.environ if n.startswith("FLEXKV_") or n == "ENABLE_FLEXKV"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FLEXKV_LOG_LEVEL", "nope")
    assert config_mod.main(["--no-check"]) == 2
    assert "log_level='nope' from env FLEXKV_LOG_LEVEL" in capsys.readouterr().err


def test_redis_password_is_never_shown():
    env = {"FLEXKV_REDIS_PASSWORD": "hunter2"}
    cfg = load_config(env, check_resources=False)
    assert cfg.redis_password == "hunter2"
    assert "hunter2" not in repr(cfg)
    out = subprocess.run([sys.executable, "-m", "flexkv_core.config", "--no-check"], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True).stdout
    assert "hunter2" not in out and "***" in out
