//! Pipelined `run` and `run_iterator` under [`StepSizeMode::Device`]: `sync_every`
//! steps are submitted before the CPU waits for their scalars, so the GPU never
//! idles while the CPU reads a step back.
//!
//! The GPU itself keeps the results those of waiting every step: once a step is
//! refused (under `Refuse`; a step skipped under `Skip` halts nothing), or `run`'s
//! stopping rule holds after a step, it skips the updates of the
//! steps already submitted behind it (`norm_final.wgsl`'s halt). The CPU then reads
//! the steps of the batch in order and stops where the GPU stopped.

use crate::config::StepSizeMode;
use crate::error::{Error, Result};
use crate::evaluation::Evaluation;
use crate::scalars::Verdict;
use crate::solver::PolyakSgd;
use crate::state::{Loss, State, stop_threshold};

impl PolyakSgd {
    /// Whether `run` and `run_iterator` pipeline their steps.
    pub(crate) fn pipelined(&self) -> bool {
        self.config.stepsize_mode == StepSizeMode::Device
            && self.config.sync_every > 1
            && self.pre_update.is_none()
    }

    /// One update per item of `steps` from `state`, `sync_every` per wait, stopping
    /// at the first refusal (an error) or, with `tol`, once `!(error > tol)`.
    pub(crate) fn run_pipelined<A, B>(
        &mut self,
        state: State<A>,
        steps: impl Iterator<Item = B>,
        tol: Option<f64>,
        f: impl FnMut(&mut Evaluation<'_>, &B) -> Result<(Loss, A)>,
    ) -> Result<State<A>> {
        match tol {
            Some(tol) => {
                let precision = self.config.dtype.precision();
                self.buffers
                    .scalars
                    .write_halt(2.0, stop_threshold(tol, precision));
            }
            None => self.buffers.scalars.write_halt(1.0, -1.0),
        }
        let out = self.batches(state, steps, tol, f);
        // Single updates never halt: disarm before whatever is submitted next.
        self.buffers.scalars.write_halt(0.0, -1.0);
        out
    }

    fn batches<A, B>(
        &mut self,
        mut state: State<A>,
        mut steps: impl Iterator<Item = B>,
        tol: Option<f64>,
        mut f: impl FnMut(&mut Evaluation<'_>, &B) -> Result<(Loss, A)>,
    ) -> Result<State<A>> {
        let depth = self.config.sync_every;
        let mut submitted: Vec<(Loss, A)> = Vec::with_capacity(depth);
        let mut scalars = Vec::with_capacity(depth);
        loop {
            // An objective that fails ends the run after the steps before it.
            let mut failed = None;
            for (slot, item) in steps.by_ref().take(depth).enumerate() {
                match self.submit_step(|ev| f(ev, &item), true, slot) {
                    Ok(done) => submitted.push(done),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if submitted.is_empty() {
                return failed.map_or(Ok(state), Err);
            }
            self.buffers
                .scalars
                .read_slots(submitted.len(), &mut scalars)?;
            for ((loss, aux), s) in submitted.drain(..).zip(&scalars) {
                let value = loss.value(s);
                let stepsize = s.step;
                match s.verdict {
                    Verdict::Applied => state = self.advance(&state, value, stepsize, s, aux),
                    // An error under Refuse (the GPU halted behind it), the skipped
                    // state under Skip (the GPU went on).
                    Verdict::Refused => state = self.refusal(&state, value, stepsize, s, aux)?,
                    // Only a halt skips a step, and the CPU stops at the halting one.
                    Verdict::Skipped => {
                        return Err(Error::Device(format!(
                            "step {} was skipped on the GPU without a halt before it",
                            state.iter_num + 1
                        )));
                    }
                }
                if tol.is_some_and(|tol| !state.should_continue(tol)) {
                    return Ok(state);
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
    }
}
