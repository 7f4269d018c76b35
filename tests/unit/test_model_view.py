"""The model view seam (selection/model_view.py): a third engine plugs in by registering a view, with
no change in selection/; every selector that runs the model hands it back through the view, however
its select ends; the plain reader refuses what looks sharded instead of reading it wrong."""

from __future__ import annotations

import pytest
import torch

from optsel.selection import FilterThenWeight, FTWConfig, model_view
from optsel.selection.base import get_selector_factory
from optsel.selection.model_view import ModelView, make_state_reader, model_view_for, register_model_view
from optsel.selection.preconditioner import TorchAdamStateReader

from support.bruteforce import tiny_llama, train_steps, trained_llama


class CountingView(ModelView):
    """A stand-in third engine: reads like the plain view, counts what selection asks of it."""

    name = "counting"

    def __init__(self, model, optimizer):
        super().__init__(model, optimizer)
        self.calls = {"prepare": 0, "full_shape": 0, "state_reader": 0, "after_selection": 0}

    def prepare(self):
        self.calls["prepare"] += 1

    def full_shape(self, param):
        self.calls["full_shape"] += 1
        return super().full_shape(param)

    def state_reader(self):
        self.calls["state_reader"] += 1
        return super().state_reader()

    def after_selection(self):
        self.calls["after_selection"] += 1


@pytest.fixture
def counting_engine():
    def detect(model, optimizer):
        return CountingView(model, optimizer) if getattr(model, "counting_engine", False) else None

    register_model_view(detect)
    try:
        yield
    finally:
        model_view.MODEL_VIEWS.remove(model_view.view_name(detect))


@pytest.fixture(scope="module")
def trained():
    return trained_llama(seed=5, steps=2, pool_size=8)


def test_a_registered_view_is_used_and_hands_the_model_back(counting_engine, trained):
    model, opt, pool, target = trained
    cfg = FTWConfig(budget=3, filter_size=6, gram="exact")
    plain = FilterThenWeight(model, opt, cfg).select(pool, target)
    assert type(model_view_for(model, opt)) is ModelView
    model.counting_engine = True
    try:
        ftw = FilterThenWeight(model, opt, cfg)
        view = ftw.view
        assert isinstance(view, CountingView) and view is not model_view_for(model, opt)
        assert view.calls["prepare"] >= 1 and view.calls["state_reader"] == 1
        assert view.calls["full_shape"] >= len(ftw.covered)
        sel = ftw.select(pool, target)
        assert view.calls["after_selection"] == 1
        # the view only reads: the selection is the plain view's
        assert torch.equal(sel.indices, plain.indices) and torch.allclose(sel.weights, plain.weights)
        with pytest.raises(ValueError, match="target"):  # however select ends, the model is handed back
            FilterThenWeight(model, opt, FTWConfig(budget=3, filter_size=6, exchange="factors")).select(pool, None)
        for name in ("greats", "less", "loss", "gradnorm", "uds"):
            selector = get_selector_factory(name)(model=model, optimizer=opt, budget=3, seed=0)
            assert isinstance(selector.view, CountingView), name
            selector.select(pool, target)
            assert selector.view.calls["after_selection"] == 1, name
    finally:
        del model.counting_engine


def test_after_selection_runs_when_select_fails(counting_engine, trained):
    model, opt, pool, target = trained
    model.counting_engine = True
    try:
        ftw = FilterThenWeight(model, opt, FTWConfig(budget=3, filter_size=6, exchange="factors"))
        with pytest.raises(ValueError, match="target"):
            ftw.select(pool, None)
        assert ftw.view.calls["after_selection"] == 1
    finally:
        del model.counting_engine


def test_plain_reader_refuses_sharded_state():
    model = tiny_llama(seed=6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 1)
    reader = make_state_reader(opt, "adam")
    assert isinstance(reader, TorchAdamStateReader)
    weight = model.model.layers[0].mlp.up_proj.weight
    state = opt.state[weight]
    state["exp_avg"] = state["exp_avg"].flatten()[: weight.numel() // 2].clone()  # a shard, not the moment
    with pytest.raises(TypeError, match="sharded"):
        reader.read(weight)


def test_plain_view_names_the_missing_engine_view():
    class NotAdam(torch.optim.SGD):
        pass

    model = tiny_llama(seed=7)
    with pytest.raises(TypeError, match="model view"):
        make_state_reader(NotAdam(model.parameters(), lr=0.1), "adam")
    with pytest.raises(ValueError, match="^geometry: "):
        make_state_reader(torch.optim.AdamW(model.parameters()), "newton")


def test_fsdp2_view_counts_the_engines_bytes_at_its_mixed_precision_dtypes(monkeypatch, tmp_path):
    """The Prometheus ratio's denominator: bf16 gathers (forward, backward) + fp32 gradient reduce-scatter
    = 8 B per parameter under optsel's bf16 policy, 12 B in fp32; nothing on one process."""
    import torch.distributed as dist

    from optsel import distributed
    from optsel.pipeline.engines.fsdp2_engine import shard_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        counts = {}
        for dtype in (torch.bfloat16, torch.float32):
            model = shard_model(tiny_llama(seed=8).float(), dtype)  # fp32 master weights, as the engine keeps
            view = model_view_for(model, None)
            assert view.name == "fsdp2" and view.engine_bytes_per_step() == 0  # one process moves nothing
            with monkeypatch.context() as patch:
                patch.setattr(distributed, "is_distributed", lambda: True)
                counts[dtype] = view.engine_bytes_per_step()
        params = sum(p.numel() for p in tiny_llama(seed=8).parameters())
        assert counts == {torch.bfloat16: 8 * params, torch.float32: 12 * params}
    finally:
        dist.destroy_process_group()
