"""Which layer imports which: the CRIU image reader makes no syscalls, nothing below imports what is above it."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules_loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``statement``."""
    program = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=60)
    return set(result.stdout.split())


def runtime_imports(path: Path) -> set[str]:
    """The cer modules a source file imports when it runs (at the top or in a function), leaving out what it
    imports for type checkers only."""
    tree = ast.parse(path.read_text())
    type_checking = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and ast.unparse(block.test) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cer"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("cer"))
    return found


def test_the_checkpoint_reader_loads_no_syscall_layer():
    """Reading a checkpoint is data only: whether its IPC namespace is a fresh one is decided where namespaces
    are built (cer.linux.sysv), which probes a namespace of its own."""
    loaded = modules_loaded_by("import cer.criu.checkpoint")
    assert "cer.linux.sysv" not in loaded
    assert "ctypes" not in loaded


def test_criu_and_linux_do_not_import_each_other():
    """cer.linux knows CRIU's data only by type (no import cycle), and the CRIU reader takes nothing from
    cer.linux but flag numbers."""
    linux = {path.name: runtime_imports(path) for path in (ROOT / "cer" / "linux").glob("*.py")}
    assert {name: sorted(m for m in imports if m.startswith("cer.criu")) for name, imports in linux.items()
            if any(m.startswith("cer.criu") for m in imports)} == {}
    criu = {path.name: runtime_imports(path) for path in (ROOT / "cer" / "criu").glob("*.py")}
    assert {m for imports in criu.values() for m in imports if m.startswith("cer.linux")} <= {"cer.linux.flags"}


def test_metrics_know_nothing_of_the_protocol():
    """The daemon hands the metrics the protocol's method names: cer.metrics sits below cer.protocol."""
    assert not {m for m in modules_loaded_by("import cer.metrics") if m.startswith("cer.protocol")}


def test_the_client_loads_no_ctypes():
    """A runtime wrapper starts a client for every restore: it names namespace types through cer.linux.flags
    and never loads the syscall layer (ctypes, libc)."""
    loaded = modules_loaded_by("import cer.protocol.client")
    assert "ctypes" not in loaded
    assert not {m for m in loaded if m.startswith("cer.linux") and m not in ("cer.linux", "cer.linux.flags")}
