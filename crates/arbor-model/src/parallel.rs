//! Tensor parallelism, device-neutral: how a model is cut across ranks ([`Shard`], one per
//! rank, from [`plan`]) and the all-reduce that the ranks of one process share
//! ([`HostAllReduce`]).
//!
//! The split is Megatron-LM's, as vLLM and SGLang make it:
//!
//! ```text
//!   embedding     rows (vocabulary) split      each rank looks up its own ids, zeros elsewhere  -> all-reduce
//!   Q, K, V       rows (heads) split            attention runs on the rank's heads alone
//!   O             columns (heads) split         partial sums of the hidden state              -> all-reduce
//!   gate, up      rows (intermediate) split     SwiGLU on the rank's columns alone
//!   down          columns (intermediate) split  partial sums                                  -> all-reduce
//!   LM head       rows (vocabulary) split       each rank's slice of the logits, gathered by the caller
//!   norms         replicated                    the hidden state is the same on every rank after a reduce
//! ```
//!
//! A slot id means the same token on every rank: each rank's KV pool holds its own heads of
//! every slot, so the engine's one slot allocator and radix tree serve all ranks unchanged.
//! When ranks outnumber the KV heads (tiny-qwen2 has one), each KV head is replicated on the
//! ranks whose query heads read it, as vLLM does.
//!
//! The all-reduce sums in rank order (rank 0's part, plus rank 1's, ...) and every rank
//! computes the same sum, so the ranks' hidden states stay bit-identical, and a run gives the
//! same bits every time. It is not the same as one rank's sum over all columns (float
//! addition is not associative): tensor-parallel logits equal TP=1's within float rounding.

use std::ops::Range;
use std::sync::{Condvar, Mutex, PoisonError, RwLock};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// One rank's part of the model: which heads, MLP columns and vocabulary rows it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    /// Ranks in all (the tensor-parallel size).
    pub size: usize,
    /// Query heads.
    pub heads: Range<usize>,
    /// KV heads stored and read: the rank's share, or the one head its query heads share
    /// when ranks outnumber KV heads (replicated).
    pub kv_heads: Range<usize>,
    /// Columns of the MLP's intermediate layer.
    pub ffn: Range<usize>,
    /// Rows of the embedding and the LM head.
    pub vocab: Range<usize>,
}

impl Shard {
    /// The whole model on one rank.
    pub fn whole(c: &ModelConfig) -> Self {
        Self {
            rank: 0,
            size: 1,
            heads: 0..c.num_heads,
            kv_heads: 0..c.num_kv_heads,
            ffn: 0..c.intermediate_size,
            vocab: 0..c.vocab_size,
        }
    }

    pub fn is_whole(&self) -> bool {
        self.size == 1
    }

    pub fn num_heads(&self) -> usize {
        self.heads.len()
    }

    pub fn num_kv_heads(&self) -> usize {
        self.kv_heads.len()
    }

    /// Width of the rank's queries (and of the attention output it projects).
    pub fn q_dim(&self, c: &ModelConfig) -> usize {
        self.heads.len() * c.head_dim
    }

    /// Width of one slot's K (or V) on this rank.
    pub fn kv_dim(&self, c: &ModelConfig) -> usize {
        self.kv_heads.len() * c.head_dim
    }

    /// Bytes of this rank's KV pool one token slot takes over every layer, at
    /// `element_bytes` per element.
    pub fn kv_bytes_per_slot(&self, c: &ModelConfig, element_bytes: usize) -> usize {
        2 * c.num_layers * self.kv_dim(c) * element_bytes
    }

    /// Rows of the Q projection (and its bias) this rank holds.
    pub fn q_rows(&self, c: &ModelConfig) -> Range<usize> {
        self.heads.start * c.head_dim..self.heads.end * c.head_dim
    }

    /// Rows of the K and V projections (and their biases) this rank holds.
    pub fn kv_rows(&self, c: &ModelConfig) -> Range<usize> {
        self.kv_heads.start * c.head_dim..self.kv_heads.end * c.head_dim
    }
}

/// An error about the tensor-parallel size; the message names the option as
/// `tensor_parallel_size` (the command line turns it into its flag).
fn bad_size(why: String) -> ModelError {
    ModelError::InvalidOption(format!("tensor_parallel_size {why}"))
}

/// Cuts `c` into `size` shards, or says why it cannot be cut that way.
pub fn plan(c: &ModelConfig, size: usize) -> Result<Vec<Shard>> {
    if size == 0 {
        return Err(bad_size("must be at least 1".into()));
    }
    if size == 1 {
        return Ok(vec![Shard::whole(c)]);
    }
    let (heads, kv) = (c.num_heads, c.num_kv_heads);
    if !heads.is_multiple_of(size) {
        return Err(bad_size(format!(
            "{size} does not divide the model's {heads} attention heads"
        )));
    }
    if !kv.is_multiple_of(size) && !size.is_multiple_of(kv) {
        return Err(bad_size(format!(
            "{size} must divide the model's {kv} KV heads or be a multiple of them"
        )));
    }
    if !c.intermediate_size.is_multiple_of(size) {
        return Err(bad_size(format!(
            "{size} does not divide the model's MLP width of {}",
            c.intermediate_size
        )));
    }
    if c.vocab_size < size {
        return Err(bad_size(format!(
            "{size} exceeds the vocabulary of {} tokens",
            c.vocab_size
        )));
    }
    let vocab_chunk = c.vocab_size.div_ceil(size);
    Ok((0..size)
        .map(|rank| {
            let kv_heads = if kv.is_multiple_of(size) {
                rank * kv / size..(rank + 1) * kv / size
            } else {
                // size / kv ranks share each KV head: the one their query heads read.
                let head = rank * kv / size;
                head..head + 1
            };
            let ffn = c.intermediate_size / size;
            Shard {
                rank,
                size,
                heads: rank * heads / size..(rank + 1) * heads / size,
                kv_heads,
                ffn: rank * ffn..(rank + 1) * ffn,
                vocab: (rank * vocab_chunk).min(c.vocab_size)
                    ..((rank + 1) * vocab_chunk).min(c.vocab_size),
            }
        })
        .collect())
}

/// The sum over ranks that a tensor-parallel forward pass calls after the row-parallel
/// projections (O, down) and the embedding.
pub trait AllReduce: Send + Sync {
    /// Replaces `buf` on every rank by the element-wise sum of all ranks' `buf`, in rank
    /// order. Every rank calls it with the same length, in the same order of calls. An error
    /// means the group failed (a rank gave up): the caller stops its step.
    fn sum(&self, rank: usize, buf: &mut [f32]) -> Result<()>;
}

/// What the tensor-parallel runner needs of a group of ranks, whatever carries its
/// collectives (a host all-reduce, NCCL): a way to break it when a rank fails, so that no
/// rank waits forever for a peer that will never join.
pub trait RankGroup: Send + Sync {
    /// Breaks the group: ranks waiting in a collective, and every later call, fail with `why`.
    fn abort(&self, why: &str);
    /// Why the group was broken, if it was.
    fn aborted(&self) -> Option<String>;
}

/// A barrier that a failing rank can break: the others stop waiting and get its reason,
/// rather than hang in a collective that will never complete.
#[derive(Debug)]
struct AbortableBarrier {
    size: usize,
    state: Mutex<BarrierState>,
    turned: Condvar,
}

#[derive(Debug, Default)]
struct BarrierState {
    arrived: usize,
    generation: u64,
    aborted: Option<String>,
}

impl AbortableBarrier {
    fn new(size: usize) -> Self {
        Self {
            size,
            state: Mutex::new(BarrierState::default()),
            turned: Condvar::new(),
        }
    }

    fn failed(why: &str) -> ModelError {
        ModelError::RankFailed(why.to_string())
    }

    fn wait(&self) -> Result<()> {
        // A panic elsewhere never leaves this state half-updated: poisoning is ignored.
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = &s.aborted {
            return Err(Self::failed(why));
        }
        let generation = s.generation;
        s.arrived += 1;
        if s.arrived == self.size {
            s.arrived = 0;
            s.generation += 1;
            self.turned.notify_all();
            return Ok(());
        }
        while s.generation == generation && s.aborted.is_none() {
            s = self.turned.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        match (&s.aborted, s.generation == generation) {
            (Some(why), true) => Err(Self::failed(why)),
            _ => Ok(()),
        }
    }

    fn abort(&self, why: &str) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.aborted.is_none() {
            s.aborted = Some(why.to_string());
        }
        self.turned.notify_all();
    }

    fn aborted(&self) -> Option<String> {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.aborted.clone()
    }
}

/// The all-reduce of ranks that are threads of one process (the CPU's tensor parallelism):
/// each rank posts its part, and after a barrier every rank sums all parts in rank order.
/// Once a rank [`aborts`](Self::abort) it, every call fails at once, now and later.
#[derive(Debug)]
pub struct HostAllReduce {
    /// Each rank's posted part; grown to the largest step's size once, then reused.
    parts: Vec<RwLock<Vec<f32>>>,
    barrier: AbortableBarrier,
}

impl HostAllReduce {
    pub fn new(size: usize) -> Self {
        Self {
            parts: (0..size).map(|_| RwLock::new(Vec::new())).collect(),
            barrier: AbortableBarrier::new(size),
        }
    }
}

impl HostAllReduce {
    /// Every rank's `part`, in rank order, on rank 0 (`None` on the others). Every rank calls
    /// it, in the same order of calls; an error means the group failed.
    pub fn gather(&self, rank: usize, part: &[f32]) -> Result<Option<Vec<Vec<f32>>>> {
        self.post(rank, part)?;
        let all = (rank == 0).then(|| {
            self.parts
                .iter()
                .map(|p| p.read().unwrap_or_else(PoisonError::into_inner).clone())
                .collect()
        });
        // Nobody posts the next part before rank 0 has read this one.
        self.barrier.wait()?;
        Ok(all)
    }

    /// Puts `part` in `rank`'s place and waits until every rank has put its own.
    fn post(&self, rank: usize, part: &[f32]) -> Result<()> {
        {
            let mut mine = self.parts[rank]
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            mine.clear();
            mine.extend_from_slice(part);
        }
        self.barrier.wait()
    }
}

impl RankGroup for HostAllReduce {
    fn abort(&self, why: &str) {
        self.barrier.abort(why);
    }

    fn aborted(&self) -> Option<String> {
        self.barrier.aborted()
    }
}

impl AllReduce for HostAllReduce {
    fn sum(&self, rank: usize, buf: &mut [f32]) -> Result<()> {
        self.post(rank, buf)?;
        for (r, part) in self.parts.iter().enumerate() {
            let part = part.read().unwrap_or_else(PoisonError::into_inner);
            if part.len() != buf.len() {
                let why = format!(
                    "all-reduce of {} values on rank {rank} met {} on rank {r}",
                    buf.len(),
                    part.len()
                );
                self.abort(&why);
                return Err(ModelError::RankFailed(why));
            }
            if r == 0 {
                buf.copy_from_slice(&part);
            } else {
                buf.iter_mut().zip(part.iter()).for_each(|(b, p)| *b += p);
            }
        }
        // Nobody posts the next part before every rank has read this one.
        self.barrier.wait()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A Llama config of these widths (no weights), for tests of the cut and the runners.
    pub(crate) fn config(heads: usize, kv: usize, ffn: usize, vocab: usize) -> ModelConfig {
        ModelConfig {
            architecture: "llama".into(),
            vocab_size: vocab,
            hidden_size: 64,
            intermediate_size: ffn,
            num_layers: 2,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            rope_style: crate::config::RopeStyle::Halves,
            rope_scaling: crate::config::RopeScaling::None,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
            qkv_bias: false,
            ggml_rope_angles: false,
        }
    }

    #[test]
    fn shards_cover_every_head_column_and_token_once() {
        let c = config(12, 4, 96, 1001);
        for size in [1, 2, 4] {
            let shards = plan(&c, size).unwrap();
            assert_eq!(shards.len(), size);
            let mut next = (0, 0, 0, 0);
            for (r, s) in shards.iter().enumerate() {
                assert_eq!((s.rank, s.size), (r, size));
                assert_eq!(
                    (s.heads.start, s.kv_heads.start, s.ffn.start, s.vocab.start),
                    next
                );
                next = (s.heads.end, s.kv_heads.end, s.ffn.end, s.vocab.end);
                // Every query head reads a KV head of the same rank.
                let group = c.num_heads / c.num_kv_heads;
                for h in s.heads.clone() {
                    assert!(s.kv_heads.contains(&(h / group)));
                }
            }
            assert_eq!(next, (12, 4, 96, 1001));
        }
    }

    #[test]
    fn ranks_beyond_the_kv_heads_replicate_the_head_their_queries_read() {
        // tiny-qwen2's shape: 4 query heads over 1 KV head; and 8 over 2 at TP 4.
        let shards = plan(&config(4, 1, 48, 100), 2).unwrap();
        assert_eq!(shards[0].kv_heads, 0..1);
        assert_eq!(shards[1].kv_heads, 0..1);
        let shards = plan(&config(8, 2, 48, 100), 4).unwrap();
        let kv: Vec<_> = shards.iter().map(|s| s.kv_heads.clone()).collect();
        assert_eq!(kv, [0..1, 0..1, 1..2, 1..2]);
        for s in &shards {
            for h in s.heads.clone() {
                assert!(s.kv_heads.contains(&(h / 4)), "rank {} head {h}", s.rank);
            }
        }
    }

    #[test]
    fn sizes_that_do_not_fit_the_model_say_why() {
        // The default model: 9 heads, 3 KV heads, MLP 1536.
        let smol = config(9, 3, 1536, 49152);
        assert!(plan(&smol, 3).is_ok());
        for (size, what) in [
            (0, "at least 1"),
            (2, "9 attention heads"),
            (9, "MLP width of 1536"),
        ] {
            let e = plan(&smol, size).unwrap_err().to_string();
            assert!(e.starts_with("tensor_parallel_size"), "{e}");
            assert!(e.contains(what), "{size}: {e}");
        }
        let e = plan(&config(12, 8, 96, 100), 3).unwrap_err().to_string();
        assert!(e.contains("8 KV heads"), "{e}");
        let e = plan(&config(4, 2, 30, 100), 4).unwrap_err().to_string();
        assert!(e.contains("MLP width of 30"), "{e}");
        let e = plan(&config(8, 8, 64, 4), 8).unwrap_err().to_string();
        assert!(e.contains("vocabulary of 4"), "{e}");
    }

    /// Runs `f(rank)` on `size` threads and returns their results in rank order.
    fn on_ranks<T: Send>(size: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let f = &f;
            let handles: Vec<_> = (0..size).map(|r| s.spawn(move || f(r))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn gather_gives_rank_zero_every_part_in_rank_order() {
        let group = HostAllReduce::new(3);
        let got = on_ranks(3, |rank| {
            let part: Vec<f32> = (0..rank + 2).map(|i| (10 * rank + i) as f32).collect();
            group.gather(rank, &part).unwrap()
        });
        let want: Vec<Vec<f32>> = vec![
            vec![0.0, 1.0],
            vec![10.0, 11.0, 12.0],
            vec![20.0, 21.0, 22.0, 23.0],
        ];
        assert_eq!(got[0].as_ref(), Some(&want));
        assert!(got[1].is_none() && got[2].is_none());
        group.abort("rank 1 failed");
        assert!(group.gather(0, &[1.0]).is_err());
    }

    #[test]
    fn all_reduce_sums_in_rank_order_and_every_rank_gets_the_same_bits() {
        for size in [1, 2, 3, 4] {
            let group = HostAllReduce::new(size);
            // Values whose sum depends on the order of addition.
            let part = |rank: usize, round: usize| -> Vec<f32> {
                (0..257)
                    .map(|i| {
                        let x = ((i * 7919 + rank * 104_729 + round * 31) % 1000) as f32;
                        if (i + rank).is_multiple_of(2) {
                            x * 1e7
                        } else {
                            -x * 1e-3
                        }
                    })
                    .collect()
            };
            let results = on_ranks(size, |rank| {
                (0..5)
                    .map(|round| {
                        // Lengths change between calls, as step sizes do.
                        let mut buf = part(rank, round);
                        buf.truncate(257 - round * 50);
                        group.sum(rank, &mut buf).unwrap();
                        buf
                    })
                    .collect::<Vec<_>>()
            });
            for round in 0..5 {
                let n = 257 - round * 50;
                let expected: Vec<f32> = (0..n)
                    .map(|i| {
                        let mut s = part(0, round)[i];
                        for r in 1..size {
                            s += part(r, round)[i];
                        }
                        s
                    })
                    .collect();
                for (rank, rounds) in results.iter().enumerate() {
                    let same = rounds[round]
                        .iter()
                        .zip(&expected)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "size {size} rank {rank} round {round}");
                }
            }
        }
    }

    #[test]
    fn a_rank_that_aborts_releases_the_others_instead_of_hanging() {
        let group = Arc::new(HostAllReduce::new(3));
        let started = Instant::now();
        let results = on_ranks(3, |rank| {
            if rank == 2 {
                std::thread::sleep(Duration::from_millis(50));
                group.abort("rank 2 panicked: injected");
                return Err(ModelError::RankFailed("rank 2 panicked: injected".into()));
            }
            let mut buf = vec![1.0; 8];
            group.sum(rank, &mut buf)
        });
        assert!(started.elapsed() < Duration::from_secs(10));
        for r in &results {
            let e = r.as_ref().unwrap_err().to_string();
            assert!(e.contains("rank 2 panicked"), "{e}");
        }
        // Later calls fail at once.
        let mut buf = vec![0.0; 4];
        assert!(group.sum(0, &mut buf).is_err());
        assert!(group.aborted().unwrap().contains("injected"));
    }

    #[test]
    fn mismatched_lengths_break_the_group_rather_than_sum_garbage() {
        let group = HostAllReduce::new(2);
        let results = on_ranks(2, |rank| {
            let mut buf = vec![1.0; 4 + rank];
            group.sum(rank, &mut buf)
        });
        assert!(results.iter().any(|r| r.is_err()));
        assert!(group.aborted().is_some());
    }
}
