"""qat.memo: values derived from a model are reused only while the model and the inputs are the same."""
import numpy as np
import tf_keras as keras

from qat.memo import Recent, derived, fingerprint


def small_model():
    inp = keras.Input((3,))
    return keras.Model(inp, keras.layers.Dense(2)(inp))


def test_derived_is_computed_once_per_model_weights_and_inputs():
    model, calls = small_model(), []
    compute = lambda: calls.append(1) or len(calls)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert derived(model, "v", compute, x) == 1
    assert derived(model, "v", compute, x.copy()) == 1              # equal bytes: reused
    assert derived(model, "v", compute, x + 1) == 2                 # other inputs
    assert derived(model, "w", compute, x) == 3                     # another value
    assert derived(small_model(), "v", compute, x) == 4             # another model
    model.layers[-1].kernel.assign(model.layers[-1].kernel + 1.0)
    assert derived(model, "v", compute, x) == 5                     # changed weights: computed again


def test_fingerprint_tells_shapes_dtypes_and_values_apart():
    a = np.zeros((2, 3), np.float32)
    assert fingerprint(a) == fingerprint(np.zeros((2, 3), np.float32))
    assert len({fingerprint(a), fingerprint(a.reshape(3, 2)), fingerprint(a.astype(np.float64)),
                fingerprint(a + 1), fingerprint("a"), fingerprint(a, 1)}) == 6


def test_recent_keeps_the_most_recently_used():
    r = Recent(2)
    r.put("a", 1)
    r.put("b", 2)
    assert r.get("a") == 1          # a is now the most recent
    r.put("c", 3)                   # b, the least recent, goes
    assert (r.get("a"), r.get("b"), r.get("c")) == (1, None, 3)
    r.pop("a")
    assert r.get("a") is None
