"""jit over a 4-device Mesh, pmap over 4 devices and a single device give the same training run."""

import textwrap

import numpy as np
import pytest

from conftest import run_on_devices

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, 'tests')
    from configs import test as test_config
    from sepres_jax import train
    from test_train import _batch

    assert jax.device_count() == 4, jax.devices()
    config = test_config.get_config()
    config.learning_rate = 1e-2
    config.lovasz_weight = 0.5  # Its per-image sum over the global image count, too.
    batches = [_batch(config, 8, seed=s) for s in range(5)]
    results = {}
    for name, mode, devices in [('jit4', 'jit', jax.devices()), ('pmap4', 'pmap', jax.devices()),
                                ('single', 'jit', jax.devices()[:1])]:
      config.parallelism = mode
      mesh = train.make_mesh(devices)
      model = train.models.create_model(config, train.num_outputs(config),
                                        bn_axis_name='batch' if mode == 'pmap' else None)
      state = train.create_train_state(config, model, jax.random.key(0), mesh)
      stepper = train.Stepper(config, mesh, None)
      state = stepper.to_step_state(state)
      losses = []
      for b in batches:
        state, out = stepper.train(state, stepper.batch(b))
        out = stepper.fetch(out)
        losses.append(float(out['loss_sum'] / out['weight']))
      final = stepper.from_step_state(state)
      val = train.evaluate_split(stepper, state, batches[:2])
      results[name] = {'losses': losses, 'val_loss': val['loss'], 'miou': val['miou'],
                       'param_sum': float(sum(np.abs(np.asarray(x)).sum()
                                              for x in jax.tree.leaves(final.params))),
                       'bn_mean': np.asarray(final.batch_stats['stem_bn']['mean']).tolist()}
    print('RESULT', json.dumps(results))
""")


@pytest.mark.multidevice
def test_jit_pmap_and_single_device_agree():
  r = run_on_devices(SCRIPT, 4)
  ref = r['single']
  assert ref['losses'][-1] < ref['losses'][0]  # It trained.
  for name in ('jit4', 'pmap4'):
    np.testing.assert_allclose(r[name]['losses'], ref['losses'], rtol=2e-4, err_msg=name)
    np.testing.assert_allclose(r[name]['val_loss'], ref['val_loss'], rtol=2e-4, err_msg=name)
    np.testing.assert_allclose(r[name]['param_sum'], ref['param_sum'], rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(r[name]['bn_mean'], ref['bn_mean'], rtol=1e-3, atol=1e-5,
                               err_msg=name)
