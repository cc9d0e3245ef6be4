"""A retrace of the train or eval step is a bug (chex.assert_max_traces in trainer.programs):
the configured batch traces once, however often it is lowered; another shape fails loudly."""

import jax
import pytest

from configs import student as student_configs
from spatial_distill import aot, sharding


def _programs(lengths=(13, 5)):
    c = student_configs.get_config("tiny")
    c.model.vision.checkpoint = None
    c.model.vision.pos_embed_size = None
    c.data.image_size = 56
    c.train.batch_size = 2
    c.input.max_prompt_len, c.input.max_answer_len = lengths  # no records to read them from
    devices = jax.devices()[:1]
    c.mesh.shape = (1, 1, 1)
    return aot.build(c, devices, aot.ShapeOnlyTokenizer(c.model.decoder.vocab_size))


def test_unset_lengths_are_named_before_anything_is_built():
    with pytest.raises(ValueError, match=r"config.input.max_answer_len is unset: .*dump.with_record_lengths"):
        _programs((13, None))


def test_train_and_eval_steps_trace_once_and_a_new_shape_is_an_error():
    prog, mesh = _programs()
    with sharding.axis_rules(mesh, sharding.DEFAULT_RULES):
        prog.train_fn.lower(prog.abstract_state, prog.train_spec)
        prog.train_fn.lower(prog.abstract_state, prog.train_spec)  # cached: not traced again
        bigger = {k: jax.ShapeDtypeStruct((2 * v.shape[0],) + v.shape[1:], v.dtype, sharding=v.sharding)
                  for k, v in prog.train_spec.items()}
        with pytest.raises(AssertionError, match="Function 'train_step' is traced > 1 times"):
            prog.train_fn.lower(prog.abstract_state, bigger)
        params, dwa = prog.abstract_state.params, prog.abstract_state.dwa
        prog.eval_fn.lower(params, dwa, prog.batch_spec)
        with pytest.raises(AssertionError, match="Function 'eval_step' is traced > 1 times"):
            prog.eval_fn.lower(params, dwa, {k: v for k, v in bigger.items() if k in prog.batch_spec})
    # A new Programs (a new run in this process) starts its own count.
    prog, mesh = _programs()
    with sharding.axis_rules(mesh, sharding.DEFAULT_RULES):
        prog.train_fn.lower(prog.abstract_state, prog.train_spec)
