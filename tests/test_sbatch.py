"""launch/slurm_wan14b.sbatch end to end under stand-in `sbatch`, `srun` and `scontrol` (bash scripts on PATH
that log their arguments and run the command as SLURM would): submitted through launch/submit.sh from another
directory, run from a spool copy, stopped by SIGUSR1 and then SIGTERM, requeued each time, finished."""
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SBATCH = r"""#!/usr/bin/env bash
# stand-in sbatch: a job id (STANDIN_JOB_ID for a requeue), SLURM's variables, the script copied to a spool
# folder, --output opened relative to the submit directory (failing if its folder is missing, as slurmd does)
set -euo pipefail
echo "sbatch $*" >> "$STANDIN/calls.log"
script=$1; shift
id=${STANDIN_JOB_ID:-$((RANDOM + 1000))}
name=$(sed -n 's/^#SBATCH --job-name=//p' "$script")
out=$(sed -n 's/^#SBATCH --output=//p' "$script" | sed "s/%x/$name/; s/%j/$id/")
[ -d "$(dirname "$out")" ] || { echo "slurmstepd: error: could not open $out" > "$STANDIN/job$id.failed"; exit 0; }
mkdir -p "$STANDIN/spool/job$id"
cp "$script" "$STANDIN/spool/job$id/slurm_script"
echo "Command=$(cd "$(dirname "$script")" && pwd)/$(basename "$script")" > "$STANDIN/job$id.info"
export SLURM_JOB_ID=$id SLURM_JOB_NAME=$name SLURM_JOB_NODELIST=localhost SLURM_NNODES=1 SLURM_NTASKS=1 \
  SLURM_CPUS_PER_TASK=1 SLURM_SUBMIT_DIR=$PWD SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}
bash "$STANDIN/spool/job$id/slurm_script" "$@" >> "$out" 2>&1 &
echo $! > "$STANDIN/job$id.pid"
echo "Submitted batch job $id"
"""

SRUN = r"""#!/usr/bin/env bash
# stand-in srun: SLURM_NTASKS copies of the command with SLURM_PROCID / SLURM_LOCALID, signals forwarded to
# them, the highest exit status returned
echo "srun $*" >> "$STANDIN/calls.log"
while [[ "${1:-}" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
for sig in USR1 TERM; do trap "echo 'srun: forwarding SIG$sig' >> \"\$STANDIN/calls.log\"; kill -s $sig ${pids[*]} 2>/dev/null" $sig; done
status=0
for pid in "${pids[@]}"; do
  while true; do wait "$pid"; s=$?; kill -0 "$pid" 2>/dev/null || break; done
  (( s > status )) && status=$s
done
exit $status
"""

SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$STANDIN/calls.log"
case "$1 $2" in
  "show hostnames") echo 127.0.0.1 ;;
  "show job") cat "$STANDIN/job$3.info" ;;
  "requeue "*) touch "$STANDIN/requeued$2" ;;
esac
"""


def _stand_ins(folder):
    bin_dir = os.path.join(folder, "bin")
    os.makedirs(bin_dir)
    for name, text in (("sbatch", SBATCH), ("srun", SRUN), ("scontrol", SCONTROL)):
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
    return bin_dir


def _wait_for(predicate, what, timeout=240):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _job_done(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_sbatch_requeues_after_usr1_and_term_then_finishes(tmp_path):
    standin = str(tmp_path / "slurm")
    bin_dir = _stand_ins(standin)
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STANDIN=standin, STANDIN_JOB_ID="4242",
               PYTHONPATH=f"{REPO}:{REPO}/kernels", PYTHON=sys.executable, RECIPE="tiny_wan", RUN_DIR=str(run_dir),
               ENV_FILE="env/cpu.env", MASTER_PORT=str(29500 + os.getpid() % 1000), EXIT_AFTER_MINUTES="0",
               SAVE_EVERY_MINUTES="0")
    args = ["--data.shards", str(tmp_path / "data"), "--data.synthesize_if_missing", "true",
            "--data.synthetic_samples", "8", "--data.synthetic_latent_size", "2,8,8", "--train.steps", "10",
            "--train.save_interval", "2", "--train.log_interval", "1"]
    log = os.path.join(REPO, "launch", "logs", "qvgen-wan14b-4242.out")
    if os.path.exists(log):
        os.remove(log)

    def submit(restart):
        # from another directory, through the wrapper; the job runs a spool copy of the script
        out = subprocess.run([os.path.join(REPO, "launch", "submit.sh"), "launch/slurm_wan14b.sbatch", *args],
                             cwd=str(tmp_path), env=dict(env, SLURM_RESTART_COUNT=str(restart)),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "Submitted batch job 4242" in out.stdout, out.stderr
        assert not os.path.exists(os.path.join(standin, "job4242.failed"))
        return int(open(os.path.join(standin, "job4242.pid")).read())

    def latest():
        name = (ckpts / "latest").read_text().strip() if (ckpts / "latest").is_file() else "iter_0"
        return int(name.split("_")[1])

    def stop_after(pid, sig, step):
        _wait_for(lambda: latest() >= step, f"a checkpoint of step {step} or later")
        os.kill(pid, sig)
        _wait_for(lambda: _job_done(pid), "the job to end")
        assert os.path.exists(os.path.join(standin, "requeued4242")), open(log).read()[-3000:]
        os.remove(os.path.join(standin, "requeued4242"))

    try:
        stop_after(submit(0), signal.SIGUSR1, 2)
        first = latest()
        stop_after(submit(1), signal.SIGTERM, first + 2)
        assert latest() > first + 1
        pid = submit(2)
        _wait_for(lambda: _job_done(pid), "the last job to end")
        text = open(log).read()
        assert (ckpts / "latest").read_text().strip() == "iter_0000010"
        assert not os.path.exists(os.path.join(standin, "requeued4242"))
        assert text.count("requeueing job 4242") == 2 and "SIGUSR1: asking every rank" in text
        assert "SIGTERM: asking every rank" in text and "finished: every rank exited 0" in text
        assert text.count("qvgen: stopped to be requeued") == 2 and "qvgen: finished: step 10/10" in text
        calls = open(os.path.join(standin, "calls.log")).read()
        assert calls.count("srun --kill-on-bad-exit=0 --wait=120 --cpus-per-task=1 ") == 3
        assert "srun: forwarding SIGUSR1" in calls and "srun: forwarding SIGTERM" in calls
        assert calls.count("scontrol requeue 4242") == 2 and "scontrol show job 4242" in calls
    finally:
        if os.path.exists(log):
            os.remove(log)
