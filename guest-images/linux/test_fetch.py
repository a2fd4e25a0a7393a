"""build.py's fetch: a pinned package the mirror no longer has falls back to the mirror's
current one, verified against apt's index, and says which it used."""

import hashlib
import importlib.util
import io
import subprocess
import sys
import tempfile
import unittest
from contextlib import redirect_stdout
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("linux_build_under_test", HERE / "build.py")
build = importlib.util.module_from_spec(_spec)
sys.modules["linux_build_under_test"] = build
_spec.loader.exec_module(build)

NEW_DEB = b"the mirror's current kernel package"


def completed(rc: int, stderr: str = "") -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], rc, "", stderr)


class FetchFallback(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        patch = mock.patch.object(build, "CACHE_DIR", Path(self.tmp.name))
        patch.start()
        self.addCleanup(patch.stop)
        self.pinned = build.Package("kernel", "linux-image-6.1.0-56-amd64", "6.1.192-2", "amd64",
                                    "0" * 64, "linux-image-amd64")
        self.now = build.Package("kernel", "linux-image-6.1.0-57-amd64", "6.1.192-3", "amd64",
                                 hashlib.sha256(NEW_DEB).hexdigest(), "linux-image-amd64")

    def download(self, pkg, dest):
        """apt-get download: the mirror has only the current package."""
        if pkg.version != self.now.version:
            return completed(100, f"E: Version '{pkg.version}' for '{pkg.name}' was not found")
        (dest / pkg.deb_name).write_bytes(NEW_DEB)
        return completed(0)

    def test_a_gone_pin_falls_back_to_the_current_package(self):
        out = io.StringIO()
        with mock.patch.object(build, "apt_get_download", self.download), \
                mock.patch.object(build, "run", return_value=completed(0)), \
                mock.patch.object(build, "current", return_value=self.now), \
                redirect_stdout(out):
            used, deb = build.fetch(self.pinned)
        self.assertEqual(used, self.now)
        self.assertEqual(deb.read_bytes(), NEW_DEB)
        said = [line for line in out.getvalue().splitlines() if "is gone from the mirror" in line]
        self.assertEqual(len(said), 1, out.getvalue())
        self.assertIn("linux-image-6.1.0-57-amd64=6.1.192-3", said[0])

    def test_the_fallback_is_checked_against_the_index(self):
        tampered = build.Package(**{**self.now.__dict__, "sha256": "f" * 64})
        with mock.patch.object(build, "apt_get_download", self.download), \
                mock.patch.object(build, "run", return_value=completed(0)), \
                mock.patch.object(build, "current", return_value=tampered), \
                redirect_stdout(io.StringIO()):
            with self.assertRaises(build.BuildError) as err:
                build.fetch(self.pinned)
        self.assertIn("does not match", str(err.exception))

    def test_other_download_errors_are_not_papered_over(self):
        with mock.patch.object(build, "apt_get_download",
                               return_value=completed(100, "E: Failed to fetch: 503")), \
                redirect_stdout(io.StringIO()):
            with self.assertRaises(build.BuildError):
                build.fetch(self.pinned)


if __name__ == "__main__":
    unittest.main()
