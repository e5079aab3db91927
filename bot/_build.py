"""The build step that puts the default templates in the wheel (pyproject.toml's cmdclass).

The templates live at the top of the repository, templates/, where operators find them; the
installed package finds them in bot/templates/ (bot/publish/templates.py), so the build copies
them there. An editable install needs no copy: it reads the checkout's templates/ directly.
Not imported at run time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "templates"  # relative to ROOT
TARGET = "bot/templates"  # relative to the build folder, i.e. inside the package


class BuildWithTemplates(build_py):
    """build_py, plus templates/*.j2 copied into the built package as bot/templates/."""

    def _templates(self) -> list[Path]:
        found = sorted((ROOT / SOURCE).glob("*.j2"))
        if not found:
            raise FileNotFoundError(f"{ROOT / SOURCE}: no templates to package")
        return found

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / TARGET
        target.mkdir(parents=True, exist_ok=True)
        for source in self._templates():
            shutil.copyfile(source, target / source.name)

    def get_source_files(self) -> list[str]:
        """The sources an sdist carries: the package's, and the templates."""
        return [*super().get_source_files(),
                *(f"{SOURCE}/{p.name}" for p in self._templates())]
