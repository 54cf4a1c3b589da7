"""The trainer's command line: flags, then `train.train_and_evaluate`.

    python -m resnet_jax.train --config configs/cifar10.py:resnet56 --workdir runs/resnet56
    python -m resnet_jax.train --config configs/cpu.py:resnet20 --workdir /tmp/r20 \
        --config.data.source=folder:../shared/data/cifar10-jpeg --config.num_steps=2000

The config is checked whole (`resnet_jax.config.validate`) before any data loads; a workdir
holding a checkpoint of the same model is resumed; SIGTERM (a preempted TPU VM) and Ctrl-C save
and exit 0; a workdir written with another data set, batch or schedule is refused unless
--allow_config_change.
"""
import logging
import os

import jax
from absl import flags

from resnet_jax import checkpoint, cli, lines, parallel, storage
from resnet_jax import config as config_lib
from resnet_jax.errors import UserError, exit_on_user_error
from resnet_jax.kernels import cpu
from resnet_jax.train import log, train_and_evaluate

FLAGS = flags.FLAGS


def _define_flags():
    config_lib.define_config_flag("cifar10:resnet56", __name__)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl and TensorBoard events; a "
                        "workdir holding a checkpoint of the same model is resumed")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (several processes "
                        "started by hand; else JAX_COORDINATOR_ADDRESS or cluster detection)")
    flags.DEFINE_integer("num_processes", None, "number of processes (else JAX_NUM_PROCESSES)")
    flags.DEFINE_integer("process_id", None, "this process's index (else JAX_PROCESS_ID)")
    flags.DEFINE_bool("allow_config_change", False, "resume a workdir although its checkpoint "
                      "was trained with another data set, batch size, schedule or optimizer")
    flags.DEFINE_bool("describe", False, "print every config key with its value in --config "
                      "(without --config: the defaults), its default and its meaning, then exit")


def main(argv):
    del argv  # absl_run refuses arguments besides the flags
    if FLAGS.describe:
        print(config_lib.describe(FLAGS.config or config_lib.default_config()))
        return
    with exit_on_user_error():
        config_lib.check(FLAGS.config, num_devices=1)  # the device count is checked once known
        if not FLAGS.workdir:
            raise UserError("--workdir is required (checkpoints and metrics go there)")
        cpu.use_cpu_cores((FLAGS.config.batch_size, FLAGS.config.eval_batch_size))
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
        checkpoint.quiet_orbax()  # absl's WARNING unless --verbosity says otherwise
        if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # a resumed run skips compiling
            jax.config.update("jax_compilation_cache_dir", storage.cache_dir("jax-compile"))
        log.setLevel(logging.INFO if parallel.is_main_process() else logging.WARNING)
        result = train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                    allow_config_change=FLAGS.allow_config_change)
        if parallel.is_main_process():
            print(lines.dumps(result), flush=True)


def run():
    _define_flags()
    cli.absl_run(main, __name__, positional=0, config=True)


