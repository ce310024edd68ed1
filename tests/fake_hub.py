"""A local stand-in for the Hugging Face Hub: only the network edge is replaced.

Patched: `HfApi.create_repo`, `HfApi.upload_folder`, `HfApi.create_commit`, `HfApi.whoami` (on the class,
and on every bound copy other modules imported, e.g. `huggingface_hub.upload_folder`), and the two download
calls `hf_hub_download` / `snapshot_download` wherever they were imported. Everything above them (tokenq's
save / load, transformers' Trainer push logic, huggingface_hub's pattern filtering) runs for real.

Each repo is a folder; every commit is also kept as a snapshot, addressable by its `oid` as a revision.
"""

from __future__ import annotations

import shutil
import sys
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import MethodType

import huggingface_hub
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects

_API_METHODS = ("create_repo", "upload_folder", "create_commit", "whoami")


@dataclass
class Commit:
    repo_id: str
    oid: str
    message: str
    files: list[str]  # paths in the repo written by this commit


class FakeHub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.commits: list[Commit] = []
        self.downloads: list[str] = []  # repo paths fetched by the download calls
        self.fail_uploads: Exception | None = None

    # ---- HfApi -----------------------------------------------------------------------------------
    def create_repo(self, repo_id: str, *args, **kwargs) -> RepoUrl:
        (self.root / "repos" / repo_id).mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def whoami(self, *args, **kwargs) -> dict:
        return {"name": "tester", "type": "user"}

    def create_commit(self, *args, **kwargs):
        raise NotImplementedError("the fake hub takes uploads through upload_folder")

    def upload_folder(self, *args, repo_id: str, folder_path, path_in_repo: str | None = None,
                      commit_message: str | None = None, allow_patterns=None, ignore_patterns=None,
                      delete_patterns=None, run_as_future: bool = False, **kwargs):
        if run_as_future:
            future: Future = Future()
            try:
                future.set_result(self.upload_folder(repo_id=repo_id, folder_path=folder_path, path_in_repo=path_in_repo,
                                                     commit_message=commit_message, allow_patterns=allow_patterns,
                                                     ignore_patterns=ignore_patterns))
            except Exception as e:  # noqa: BLE001 - a Future carries any failure
                future.set_exception(e)
            return future
        if self.fail_uploads is not None:
            raise self.fail_uploads
        repo = self.root / "repos" / repo_id
        if not repo.is_dir():
            raise RepositoryNotFoundError(f"{repo_id}: create the repo first")
        folder = Path(folder_path)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        files = [f for f in files if not f.startswith(".git/") and "/.git/" not in f]
        files = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        prefix = (path_in_repo.strip("/") + "/") if path_in_repo else ""
        for rel in files:
            dest = repo / (prefix + rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / rel, dest)
        oid = f"{len(self.commits) + 1:040x}"
        shutil.copytree(repo, self.root / "snapshots" / repo_id / oid)
        self.commits.append(Commit(repo_id, oid, commit_message or "", [prefix + f for f in files]))
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}", commit_message=commit_message or "",
                          commit_description="", oid=oid)

    # ---- downloads -------------------------------------------------------------------------------
    def _tree(self, repo_id: str, revision: str | None) -> Path:
        repo = self.root / "repos" / repo_id
        if not repo.is_dir():
            raise RepositoryNotFoundError(f"404: {repo_id} not found")
        return repo if revision in (None, "main") else self.root / "snapshots" / repo_id / revision

    def hf_hub_download(self, repo_id: str, filename: str, *args, revision: str | None = None, **kwargs) -> str:
        source = self._tree(repo_id, revision) / filename
        if not source.is_file():
            raise EntryNotFoundError(f"404: {filename} not in {repo_id}")
        self.downloads.append(filename)
        dest = self.root / "cache" / repo_id / (revision or "main") / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
        return str(dest)

    def snapshot_download(self, repo_id: str, *args, revision: str | None = None, allow_patterns=None,
                          ignore_patterns=None, **kwargs) -> str:
        tree = self._tree(repo_id, revision)
        files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            self.hf_hub_download(repo_id, rel, revision=revision)
        return str(self.root / "cache" / repo_id / (revision or "main"))

    # ---- patching --------------------------------------------------------------------------------
    def install(self, monkeypatch) -> FakeHub:
        originals = {name: getattr(HfApi, name) for name in _API_METHODS}
        downloads = {huggingface_hub.file_download.hf_hub_download: self.hf_hub_download,
                     huggingface_hub._snapshot_download.snapshot_download: self.snapshot_download}
        for name in _API_METHODS:
            monkeypatch.setattr(HfApi, name, lambda api, *a, _n=name, **k: getattr(self, _n)(*a, **k))
        for module in list(sys.modules.values()):
            for attr, value in list(getattr(module, "__dict__", {}).items()):
                if isinstance(value, MethodType) and value.__func__ in originals.values() and isinstance(value.__self__, HfApi):
                    monkeypatch.setattr(module, attr, getattr(self, value.__func__.__name__))
                else:
                    for original, fake in downloads.items():
                        if value is original:
                            monkeypatch.setattr(module, attr, fake)
        return self

    def repo_files(self, repo_id: str, revision: str | None = None) -> set[str]:
        tree = self._tree(repo_id, revision)
        return {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}
