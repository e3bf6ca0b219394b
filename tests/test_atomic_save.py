"""``CrossEncoder.save`` over an existing model: an interruption at any step leaves the old model or the new one, and
the directory is never writable by others (issue 23 item 11)."""

import os
import stat

import numpy as np
import pytest

import pyterrier_kdcl as kdcl
from pyterrier_kdcl import models, paths

QUERIES = ["read file", "copy", "list a directory"]
TEXTS = ["read from a file descriptor", "copy files and directories", "list directory contents"]


@pytest.fixture
def old_and_new(tiny_model, tmp_path):
    """A model saved at ``tmp_path/model`` (old), a different one to save over it (new), and their scores."""
    old = kdcl.CrossEncoder(tiny_model("bert", seed=0), verbose=False)
    new = kdcl.CrossEncoder(tiny_model("bert", seed=1), verbose=False)
    old.save(tmp_path / "model")
    old_scores, new_scores = old.score_pairs(QUERIES, TEXTS), new.score_pairs(QUERIES, TEXTS)
    assert not np.allclose(old_scores, new_scores, atol=1e-3)  # tells the two apart below
    return tmp_path / "model", new, old_scores, new_scores


def scores_at(path):
    return kdcl.CrossEncoder.load(path, verbose=False).score_pairs(QUERIES, TEXTS)


def leftovers(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith("."))


def test_saving_over_a_model_replaces_it(old_and_new):
    path, new, _, new_scores = old_and_new
    new.save(path)
    np.testing.assert_allclose(scores_at(path), new_scores, atol=1e-6)
    assert leftovers(path) == []


def test_an_interrupted_write_keeps_the_old_model(old_and_new, monkeypatch):
    path, new, old_scores, _ = old_and_new
    save_ranker = models.save_ranker

    def write_then_die(ranker, tokenizer, tmp, settings):
        save_ranker(ranker, tokenizer, tmp, settings)
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # a Ctrl-C, or any crash, in the middle of writing

    monkeypatch.setattr(models, "save_ranker", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    np.testing.assert_allclose(scores_at(path), old_scores, atol=1e-6)
    assert leftovers(path) == []  # the half-written copy is gone


def test_an_interruption_just_before_the_swap_keeps_the_old_model(old_and_new, monkeypatch):
    path, new, old_scores, _ = old_and_new

    def die(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(paths, "_exchange", die)
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    np.testing.assert_allclose(scores_at(path), old_scores, atol=1e-6)
    assert leftovers(path) == []


def test_an_interruption_while_the_old_model_is_deleted_leaves_the_new_one(old_and_new, monkeypatch):
    path, new, _, new_scores = old_and_new

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(paths.shutil, "rmtree", die)  # only called once the swap is done
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    monkeypatch.undo()
    np.testing.assert_allclose(scores_at(path), new_scores, atol=1e-6)


def test_without_a_one_step_swap_a_failed_second_rename_puts_the_old_model_back(old_and_new, monkeypatch):
    path, new, old_scores, _ = old_and_new
    monkeypatch.setattr(paths, "_exchange", lambda a, b: False)  # a system without renameat2
    replace = os.replace

    def second_rename_dies(src, dst):
        if str(dst) == str(path) and str(src).endswith(".tmp"):  # the new model into place (not the old back)
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(paths.os, "replace", second_rename_dies)
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    monkeypatch.undo()
    np.testing.assert_allclose(scores_at(path), old_scores, atol=1e-6)
    assert leftovers(path) == []


def test_a_kill_between_the_two_renames_is_named_on_load(old_and_new, monkeypatch):
    """Where the swap takes two renames, a kill between them (no ``except`` runs) leaves the old model aside."""
    path, _, old_scores, _ = old_and_new
    aside = path.with_name(f".{path.name}.old-12345")
    os.replace(path, aside)
    with pytest.raises(FileNotFoundError, match=f"interrupted.*{aside.name}.*rename that directory"):
        kdcl.CrossEncoder.load(path, verbose=False)
    np.testing.assert_allclose(scores_at(aside), old_scores, atol=1e-6)


def test_the_directory_is_never_writable_by_others(old_and_new, monkeypatch):
    """It has the umask's mode already when it appears under its name (pt.io renames a 0o777 one, then chmods)."""
    path, new, _, _ = old_and_new
    modes = []
    exchange, replace = paths._exchange, os.replace

    def record(rename):
        def renamed(src, dst, *args):
            if os.path.isdir(src):  # the model directory (libraries may rename files inside it too)
                modes.append(stat.S_IMODE(os.stat(src).st_mode))
            return rename(src, dst, *args)
        return renamed

    monkeypatch.setattr(paths, "_exchange", record(exchange))
    monkeypatch.setattr(paths.os, "replace", record(replace))
    umask = os.umask(0o002)  # a group-writable umask, as on many systems: never world-writable
    try:
        new.save(path)
        new.save(path.with_name("fresh"))
    finally:
        os.umask(umask)
    assert modes and all(mode == 0o775 for mode in modes), [oct(m) for m in modes]
    assert stat.S_IMODE(path.stat().st_mode) == 0o775
    assert stat.S_IMODE(path.with_name("fresh").stat().st_mode) == 0o775


def test_saving_over_other_files_is_refused_and_keeps_them(tiny_model, tmp_path):
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a saved reranker.*choose another path"):
        ce.save(tmp_path / "mine")
    (tmp_path / "file").write_text("keep me too")
    with pytest.raises(FileExistsError, match="is a file"):
        ce.save(tmp_path / "file")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "file").read_text() == "keep me too"
