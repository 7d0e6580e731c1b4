"""The layout rules the code is held to, checked by reading its syntax trees.

- Only ``shared/redis/`` speaks to Redis: nothing else in api/, worker/, shared/ or
  thoughtwire/ imports redis-py, hiredis or fakeredis, or builds a client (``Redis(``,
  ``from_url``, ``from_pool``). Everyone else uses the names ``shared.redis`` exports.
- Only ``shared/keys.py`` builds Redis key and channel names.

Comments and docstrings do not count: the rules read the code, not its text.
"""

from __future__ import annotations

import ast
import gc
import string
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "worker", "shared", "thoughtwire")
REDIS_HOME = ROOT / "shared" / "redis"
KEYS = ROOT / "shared" / "keys.py"
REDIS_MODULES = ("redis", "hiredis", "fakeredis")  # and everything under them
CLIENT_BUILDERS = ("Redis", "StrictRedis", "FakeAsyncRedis", "FakeRedis")
CLIENT_FACTORIES = ("from_url", "from_pool")


def sources(*, outside: Path | None = None) -> Iterator[Path]:
    """Every Python file of the packages, but those under ``outside``."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if outside is None or not path.is_relative_to(outside):
                yield path


def parse(code: str) -> ast.Module:
    """``code``'s syntax tree, parsed with the collector paused.

    On CPython 3.11 an object that another test leaked, collected in the middle of a
    parse, makes the AST constructor fail with a SystemError; the leak is reported
    where it is next collected instead.
    """
    gc.disable()
    try:
        return ast.parse(code)
    finally:
        gc.enable()


def _last_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


# --- Redis stays in shared/redis/ ---------------------------------------------------


def redis_reaches(code: str) -> list[str]:
    """Where ``code`` imports a Redis library or builds a Redis client (line: what)."""
    found = []
    for node in ast.walk(parse(code)):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        for module in modules:
            if module.split(".")[0] in REDIS_MODULES:
                found.append(f"{node.lineno}: import {module}")
        if isinstance(node, ast.Call):
            called = _last_name(node.func)
            if called in CLIENT_BUILDERS or called in CLIENT_FACTORIES:
                found.append(f"{node.lineno}: {called}(...)")
    return found


def test_the_redis_rule_catches_imports_and_clients():
    code = (
        "# from redis.asyncio import Redis: a comment is not an import\n"
        "from redis.asyncio import Redis\n"
        "import hiredis\n"
        "from redis._parsers import BaseParser\n"
        "client = Redis(port=6379)\n"
        "other = Redis.from_url('redis://x')\n"
        "from shared.redis import RedisError\n"
    )
    assert redis_reaches(code) == [
        "2: import redis.asyncio",
        "3: import hiredis",
        "4: import redis._parsers",
        "5: Redis(...)",
        "6: from_url(...)",
    ]


def test_only_shared_redis_imports_redis_or_opens_a_connection():
    """No module outside shared/redis/ imports redis-py, hiredis or fakeredis, or builds a client."""
    assert any(redis_reaches(path.read_text()) for path in REDIS_HOME.glob("*.py"))  # it looks
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in sources(outside=REDIS_HOME)
        if (found := redis_reaches(path.read_text()))
    }
    assert offenders == {}, f"Redis reached outside shared/redis/: {offenders}"


# --- keys are built in shared/keys.py -----------------------------------------------

HOLE = "\x00"  # where a formatted value goes, in a string's template


def _is_prefix(node: ast.AST | None) -> bool:
    return node is not None and _last_name(node).lower().endswith("prefix")


def _fstring(node: ast.JoinedStr) -> tuple[str, list[ast.AST | None]]:
    text, values = "", []
    for part in node.values:
        if isinstance(part, ast.Constant):
            text += str(part.value)
        elif isinstance(part, ast.FormattedValue):
            text += HOLE
            values.append(part.value)
    return text, values


def _percent(template: str, right: ast.AST) -> tuple[str, list[ast.AST | None]]:
    values: list[ast.AST | None] = list(right.elts if isinstance(right, ast.Tuple) else [right])
    text = template.replace("%%", "")
    for code in ("%s", "%d", "%r", "%x"):
        text = text.replace(code, HOLE)
    return text, values


def _format(template: str, args: list[ast.expr]) -> tuple[str, list[ast.AST | None]]:
    text, values = "", []
    for literal, field, _spec, _conversion in string.Formatter().parse(template):
        text += literal
        if field is not None:
            text += HOLE
            values.append(args[len(values)] if len(values) < len(args) else None)
    return text, values


def _concatenation(node: ast.BinOp) -> tuple[str, list[ast.AST | None]]:
    text, values = "", []
    stack: list[ast.AST] = [node]
    while stack:  # flattens a + b + c, left to right
        item = stack.pop()
        if isinstance(item, ast.BinOp) and isinstance(item.op, ast.Add):
            stack += [item.right, item.left]
        elif isinstance(item, ast.Constant) and isinstance(item.value, str):
            text += item.value
        else:
            text += HOLE
            values.append(item)
    return text, values


def _literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def template(node: ast.AST) -> tuple[str, list[ast.AST | None]] | None:
    """A string built from values (f-string, ``%``, ``.format``, ``+``) as its literal text
    with a HOLE for each value, and the values in order; None for anything else."""
    if isinstance(node, ast.JoinedStr):
        return _fstring(node)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        left = _literal(node.left)
        return None if left is None else _percent(left, node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        base = _literal(node.func.value)
        return _format(base, node.args) if node.func.attr == "format" and base else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        text, values = _concatenation(node)
        return (text, values) if values and text != HOLE * len(values) else None
    return None


def is_key(text: str, values: list[ast.AST | None]) -> bool:
    """The shapes of a Redis key or channel name: ``<prefix>:...`` (a value named like a
    prefix, or the default ``tw``), or a Cluster hash tag ``{<value>}``."""
    if text.startswith(HOLE + ":") and _is_prefix(values[0]):
        return True
    if text.startswith("tw:"):
        return True
    return "{" + HOLE + "}" in text


def key_builders(code: str) -> list[str]:
    """Where ``code`` builds a string shaped like a Redis key (line: template)."""
    found = []
    tree = parse(code)
    # An f-string's format spec is a JoinedStr of its own: read only outermost strings.
    inner = {
        id(n.format_spec)
        for n in ast.walk(tree)
        if isinstance(n, ast.FormattedValue) and n.format_spec is not None
    }
    for node in ast.walk(tree):
        if id(node) in inner:
            continue
        built = template(node)
        if built is not None and is_key(*built):
            found.append(f"{getattr(node, 'lineno', 0)}: {built[0].replace(HOLE, '{}')}")
    return found


@pytest.mark.parametrize(
    "code",
    [
        'key = f"{self.prefix}:{{{session}}}:log"',
        'key = f"{prefix}:jobs"',
        'key = "%s:jobs" % self.prefix',
        'key = "{}:jobs".format(key_prefix)',
        'key = self.prefix + ":jobs"',
        'key = f"tw:{{{session}}}:meta"',
        'key = f"sessions:{{{session}}}"',
    ],
)
def test_the_key_rule_catches_a_key_built_inline(code):
    assert len(key_builders(code)) == 1, code


@pytest.mark.parametrize(
    "code",
    [
        'where = f"{host}:{port}"',
        'url = f"http://{host}:{args.port}/"',
        'name = f"viewer:{subject}"',
        'logger.warning("run %s: lease lost", run)',
        'line = "run %s: its state was lost" % run',
        'text = f"no reply from Redis in {timeout:g} s"',
        'host += f":{parts.port}"',
    ],
)
def test_the_key_rule_lets_other_strings_be(code):
    assert key_builders(code) == [], code


def test_no_key_is_built_outside_shared_keys():
    """Every Redis key and channel name is built in shared/keys.py, and only there."""
    assert len(key_builders(KEYS.read_text())) >= 10  # the rule sees the real keys
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in sources()
        if path != KEYS and (found := key_builders(path.read_text()))
    }
    assert offenders == {}, f"keys built outside shared/keys.py: {offenders}"


def test_the_package_installs_under_its_own_name_only(tmp_path: Path) -> None:
    """The design's folders stay at the top of the repo (``thoughtwire/api`` and the others
    are links to them), but an installed thoughtwire brings only ``thoughtwire.*``: no
    top-level ``api``, ``shared`` or ``worker`` to collide with an application's own."""
    import shutil
    import subprocess
    import sys
    import zipfile

    # From a copy: a build/ folder left in the checkout by an older layout would be packed too.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "node_modules"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("thoughtwire-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith("thoughtwire-")}
    assert tops == {"thoughtwire"}, tops
    for module in ("api/app.py", "shared/redis/pipeline.py", "worker/runner.py"):
        assert f"thoughtwire/{module}" in names
    assert "thoughtwire/api/static/thoughtwire.js" in names
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as unpacked:
        unpacked.extractall(site)
    check = (
        "import importlib.util as u, sys;"
        "assert u.find_spec('thoughtwire.api') is not None;"
        "assert all(u.find_spec(n) is None for n in ('api', 'shared', 'worker'))"
    )
    # -S: no site-packages (where this checkout is installed), only the unpacked wheel.
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            f"import sys; sys.path.insert(0, {str(site)!r}); {check}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


# --- only shared/ builds names or reaches the bus's Redis ----------------------------

SHARED = ROOT / "shared"


def bus_reaches(code: str) -> list[str]:
    """Where ``code`` reaches past the bus: ``.redis`` of a bus, ``.keys``, ``Keys`` (line: what).

    ``Keys(...)`` is allowed only as an argument of ``Bus(...)``: a process builds its
    bus with its prefix and never names a key itself. ``x.keys()`` (a dict's) is a call,
    not the attribute, and is let be.
    """
    tree = parse(code)
    handed: set[int] = set()  # the Keys(...) calls handed straight to Bus(...)
    called: set[int] = set()  # what is called (x.keys() is a dict's)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            called.add(id(node.func))
            if _last_name(node.func) == "Bus":
                handed.update(id(arg) for arg in node.args)
    found = [
        (node.lineno, what) for node in ast.walk(tree) if (what := _reach(node, handed, called))
    ]
    return [f"{line}: {what}" for line, what in sorted(found)]


def _reach(node: ast.AST, handed: set[int], called: set[int]) -> str:
    """What ``node`` reaches past the bus, or ""."""
    if isinstance(node, ast.Attribute):
        if node.attr == "redis" and "bus" in _last_name(node.value).lower():
            return f"{_last_name(node.value)}.redis"
        if node.attr == "keys" and id(node) not in called:
            return ".keys"
    elif isinstance(node, ast.Call) and _last_name(node.func) == "Keys" and id(node) not in handed:
        return "Keys(...)"
    elif isinstance(node, ast.Name) and node.id == "Keys" and id(node) not in called:
        return "Keys"
    return ""


def test_the_bus_rule_catches_keys_and_raw_redis():
    code = (
        "Bus(redis, Keys('tw'), log_maxlen=1, log_ttl=1)\n"
        "await bus.redis.get('x')\n"
        "channel = self.bus.keys.session_channel(s)\n"
        "keys = Keys('tw')\n"
        "def f(k: Keys): return {}.keys()\n"
        "await self.frontend.bus.redis.ping()\n"
        "slots = frontend.keys.user_runs(u)\n"
    )
    assert bus_reaches(code) == [
        "2: bus.redis",
        "3: .keys",
        "4: Keys(...)",
        "5: Keys",
        "6: bus.redis",
        "7: .keys",
    ]


def test_nothing_outside_shared_builds_a_key_or_reaches_the_bus_redis():
    """api/ and worker/ ask the bus and grants by domain: no key names, no raw Redis calls."""
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in sources()
        if not path.resolve().is_relative_to(SHARED) and (found := bus_reaches(path.read_text()))
    }
    assert offenders == {}, f"keys or the bus's Redis reached outside shared/: {offenders}"
