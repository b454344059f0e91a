//! The routed-expert stage on the CPU: a stable counting sort of (token, slot) pairs by expert,
//! per-expert batched GEMMs over chunks of sorted rows (gate and up, the gated activation, down),
//! and a combine that sums each token's slots in slot order in f32. Rows of one expert are
//! contiguous after the sort, so each chunk is two dense GEMMs instead of k·T vector products.

use parking_lot::Mutex;
use rayon::prelude::*;

use super::linear::Linear;
use super::weights::ExpertLinears;
use crate::activation::apply_gated;
use crate::config::FdmoeActivation;

/// Rows of one expert handled by one task: enough for the GEMM to reach its peak rate, few
/// enough that the gathered input and the activations stay in L2 per thread.
pub(crate) const ROWS_PER_TASK: usize = 128;

/// Where each routed slot went after sorting by expert.
pub struct ExpertSort {
    /// Rows routed to each expert.
    pub tokens_per_expert: Vec<usize>,
    /// Start of each expert's rows in the sorted order; `expert_offsets[E]` = T·k.
    pub expert_offsets: Vec<usize>,
    /// sorted position -> slot index t·k + j.
    pub sorted_slots: Vec<usize>,
    /// slot index t·k + j -> sorted position.
    pub slot_positions: Vec<usize>,
    /// Next free position of each expert while filling.
    cursor: Vec<usize>,
}

impl ExpertSort {
    pub fn with_capacity(num_experts: usize, max_slots: usize) -> Self {
        ExpertSort {
            tokens_per_expert: vec![0; num_experts],
            expert_offsets: vec![0; num_experts + 1],
            sorted_slots: vec![0; max_slots],
            slot_positions: vec![0; max_slots],
            cursor: vec![0; num_experts],
        }
    }

    /// Stable by (expert, token, slot): the order is a function of the ids alone.
    pub fn sort(&mut self, ids: &[i32]) {
        self.tokens_per_expert.iter_mut().for_each(|c| *c = 0);
        for &e in ids {
            self.tokens_per_expert[e as usize] += 1;
        }
        let mut running = 0;
        for (e, &count) in self.tokens_per_expert.iter().enumerate() {
            self.expert_offsets[e] = running;
            running += count;
        }
        *self.expert_offsets.last_mut().expect("E + 1 offsets") = running;
        self.cursor
            .copy_from_slice(&self.expert_offsets[..self.tokens_per_expert.len()]);
        for (slot, &e) in ids.iter().enumerate() {
            let pos = &mut self.cursor[e as usize];
            self.sorted_slots[*pos] = slot;
            self.slot_positions[slot] = *pos;
            *pos += 1;
        }
    }
}

/// Per-thread scratch of one task: gathered inputs, gate and up activations.
pub struct TaskScratch {
    inputs: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl TaskScratch {
    pub fn new(expert_hidden: usize, intermediate: usize) -> Self {
        TaskScratch {
            inputs: vec![0.0; ROWS_PER_TASK * expert_hidden],
            gate: vec![0.0; ROWS_PER_TASK * intermediate],
            up: vec![0.0; ROWS_PER_TASK * intermediate],
        }
    }

    pub fn bytes(expert_hidden: usize, intermediate: usize) -> usize {
        ROWS_PER_TASK * (expert_hidden + 2 * intermediate) * 4
    }
}

/// One task: `rows` sorted rows of `expert` starting at sorted position `first`.
#[derive(Debug, Clone, Copy)]
pub struct ExpertTask {
    expert: usize,
    first: usize,
    rows: usize,
}

/// A raw pointer shared by tasks that write disjoint rows.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes a disjoint range of rows (distinct sorted positions).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Everything the expert stage reads and writes, borrowed from the backend's workspace.
pub struct ExpertStage<'a> {
    pub experts: &'a [ExpertLinears],
    pub activation: FdmoeActivation,
    pub top_k: usize,
    pub expert_hidden: usize,
    pub intermediate: usize,
    pub threads: usize,
    /// Applied to each activation row ([intermediate] values) before the down GEMM: the FP8
    /// round trip of FP8_BLOCK's or FP8_MX's activation quantization; `None` otherwise.
    pub row_transform: Option<fn(&mut [f32])>,
}

impl ExpertStage<'_> {
    /// Fills `tasks` from the sort (reusing its capacity).
    pub fn plan(&self, sort: &ExpertSort, tasks: &mut Vec<ExpertTask>) {
        tasks.clear();
        for (expert, &count) in sort.tokens_per_expert.iter().enumerate() {
            let mut first = sort.expert_offsets[expert];
            let end = first + count;
            while first < end {
                let rows = (end - first).min(ROWS_PER_TASK);
                tasks.push(ExpertTask {
                    expert,
                    first,
                    rows,
                });
                first += rows;
            }
        }
    }

    /// y_sorted[pos] = down(act(gate(u[token(pos)]), up(u[token(pos)]))) for every sorted row.
    /// Many tasks run in parallel with single-threaded GEMMs; few tasks run in order with
    /// every thread inside each GEMM. Either way each output row is one GEMM's row: the result
    /// does not depend on the schedule.
    pub fn run(
        &self,
        sort: &ExpertSort,
        tasks: &[ExpertTask],
        inputs: &[f32],
        y_sorted: &mut [f32],
        scratch: &[Mutex<TaskScratch>],
    ) {
        let y = SharedMut(y_sorted.as_mut_ptr());
        if tasks.len() >= 2 * self.threads {
            tasks.par_iter().for_each(|task| {
                let slot = rayon::current_thread_index().unwrap_or(0) % scratch.len();
                let mut s = scratch[slot].lock();
                self.run_task(task, sort, inputs, y, &mut s, 1);
            });
        } else {
            let mut s = scratch[0].lock();
            for task in tasks {
                self.run_task(task, sort, inputs, y, &mut s, self.threads);
            }
        }
    }

    fn run_task(
        &self,
        task: &ExpertTask,
        sort: &ExpertSort,
        inputs: &[f32],
        y: SharedMut,
        s: &mut TaskScratch,
        threads: usize,
    ) {
        let (l, i, n) = (self.expert_hidden, self.intermediate, task.rows);
        for r in 0..n {
            let token = sort.sorted_slots[task.first + r] / self.top_k;
            s.inputs[r * l..(r + 1) * l].copy_from_slice(&inputs[token * l..(token + 1) * l]);
        }
        let w = &self.experts[task.expert];
        let gate = &mut s.gate[..n * i];
        let up = &mut s.up[..n * i];
        // SAFETY: scratch holds ROWS_PER_TASK rows; y_sorted holds T·k rows of L and this task
        // owns rows [first, first + n).
        unsafe {
            apply(w.gate, n, &s.inputs, gate, threads);
            apply(w.up, n, &s.inputs, up, threads);
            apply_gated(self.activation, gate, up);
            if let Some(transform) = self.row_transform {
                gate.chunks_exact_mut(i).for_each(transform);
            }
            w.down.apply(
                n,
                gate.as_ptr(),
                i,
                y.0.add(task.first * l),
                l,
                false,
                threads,
            );
        }
    }
}

unsafe fn apply(lin: Linear, rows: usize, x: &[f32], y: &mut [f32], threads: usize) {
    lin.apply(
        rows,
        x.as_ptr(),
        lin.in_features,
        y.as_mut_ptr(),
        lin.out_features,
        false,
        threads,
    );
}

/// out[t] = Σ_j weights[t, j] · y_sorted[position(t, j)], in slot order, in f32.
pub fn combine(
    sort: &ExpertSort,
    weights: &[f32],
    y_sorted: &[f32],
    top_k: usize,
    width: usize,
    out: &mut [f32],
) {
    out.par_chunks_mut(width).enumerate().for_each(|(t, row)| {
        row.iter_mut().for_each(|v| *v = 0.0);
        for j in 0..top_k {
            let w = weights[t * top_k + j];
            let pos = sort.slot_positions[t * top_k + j];
            let y = &y_sorted[pos * width..(pos + 1) * width];
            row.iter_mut().zip(y).for_each(|(o, &v)| *o += w * v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_is_stable_by_expert_then_slot() {
        let mut s = ExpertSort::with_capacity(3, 6);
        s.sort(&[2, 0, 0, 2, 1, 0]);
        assert_eq!(s.tokens_per_expert, vec![3, 1, 2]);
        assert_eq!(s.expert_offsets, vec![0, 3, 4, 6]);
        assert_eq!(&s.sorted_slots[..6], &[1, 2, 5, 4, 0, 3]);
        for (pos, &slot) in s.sorted_slots.iter().enumerate() {
            assert_eq!(s.slot_positions[slot], pos);
        }
    }

    /// Runs sort, plan, expert stage and combine for `ids` in a pool of `threads` threads.
    fn stage_output(
        experts: &[ExpertLinears],
        (l, i, k): (usize, usize, usize),
        inputs: &[f32],
        ids: &[i32],
        weights: &[f32],
        threads: usize,
    ) -> Vec<f32> {
        let slots = ids.len();
        let mut sort = ExpertSort::with_capacity(experts.len(), slots);
        sort.sort(ids);
        let stage = ExpertStage {
            experts,
            activation: FdmoeActivation::Swiglu,
            top_k: k,
            expert_hidden: l,
            intermediate: i,
            threads,
            row_transform: None,
        };
        let mut tasks = Vec::new();
        stage.plan(&sort, &mut tasks);
        let scratch: Vec<_> = (0..threads)
            .map(|_| Mutex::new(TaskScratch::new(l, i)))
            .collect();
        let mut y_sorted = vec![0.0; slots * l];
        let mut out = vec![f32::NAN; slots / k * l];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            stage.run(&sort, &tasks, inputs, &mut y_sorted, &scratch);
            combine(&sort, weights, &y_sorted, k, l, &mut out);
        });
        out
    }

    /// The same inputs give the same bits on one thread or two, with tasks spread over the
    /// threads (many experts) or threads inside each product (few), run after run.
    #[test]
    fn output_does_not_depend_on_threads_or_schedule() {
        // l and i of 2 × 64 rows and more, so the products split over 2 threads (and a k tail).
        let (l, i, k, t) = (140usize, 132usize, 2usize, 12usize);
        let values = |n: usize, seed: f32| -> Vec<f32> {
            (0..n).map(|v| ((v as f32 + seed) * 0.37).sin()).collect()
        };
        for num_experts in [2usize, 6] {
            let w: Vec<Vec<f32>> = (0..num_experts)
                .map(|e| values(3 * i * l, e as f32 * 11.0))
                .collect();
            let experts: Vec<ExpertLinears> = w
                .iter()
                .map(|w| ExpertLinears {
                    gate: Linear::row_major(w.as_ptr(), i, l),
                    up: Linear::row_major(w[i * l..].as_ptr(), i, l),
                    down: Linear::row_major(w[2 * i * l..].as_ptr(), l, i),
                })
                .collect();
            let inputs = values(t * l, 0.5);
            let ids: Vec<i32> = (0..t * k)
                .map(|s| ((s * 7 + s / k) % num_experts) as i32)
                .collect();
            let weights = values(t * k, 3.0);
            let dims = (l, i, k);
            let reference = stage_output(&experts, dims, &inputs, &ids, &weights, 1);
            assert!(reference.iter().all(|v| v.is_finite()));
            for threads in [1, 2, 2] {
                let out = stage_output(&experts, dims, &inputs, &ids, &weights, threads);
                assert!(
                    out.iter()
                        .zip(&reference)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{num_experts} experts, {threads} threads"
                );
            }
        }
    }
}
