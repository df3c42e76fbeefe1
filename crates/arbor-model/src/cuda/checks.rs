//! Diagnostics of the GPU kernels, outside the runner: attention and GEMV against host
//! references on chosen inputs, and one layer's linear layers timed by weight format.
//! `arbor_model::diagnostics` drives them.

use super::*;

/// Arbor's GEMV against cuBLAS on random data: `(rows, out, in, max |difference| / max |y|)`
/// per shape (the 8B shape's layers, the default model's, an odd small one); rows 0 stands
/// for one row through the programmatic-dependent launch (`gemv_pdl_into`).
pub fn gemv_check(device: &Device) -> Result<Vec<(usize, usize, usize, f64)>> {
    let mut rows = Vec::new();
    for (n, k) in [(6144, 4096), (4096, 14336), (1000, 576), (37, 8)] {
        let w = Tensor::randn(0f32, 0.02, (n, k), device)?.to_dtype(DType::BF16)?;
        for m in 1..=GEMV_MAX_ROWS {
            let x = Tensor::randn(0f32, 1.0, (m, k), device)?.to_dtype(DType::BF16)?;
            let theirs = x.matmul(&w.t()?)?.to_dtype(DType::F32)?;
            let scale = theirs.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
            let ours = gemv(&x, &w)?.to_dtype(DType::F32)?;
            let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            rows.push((m, n, k, f64::from(diff / scale)));
            // The programmatic-dependent launch of the same kernel.
            if m == 1 && weight_fits_gemv(&w) {
                let dev = cuda_device(device)?;
                let x_s = dev
                    .cuda_stream()
                    .clone_htod(&x.flatten_all()?.to_vec1::<bf16>()?)
                    .map_err(cuda_err)?;
                let mut y = dev.cuda_stream().alloc_zeros::<bf16>(n).map_err(cuda_err)?;
                gemv_pdl_into(dev, &x_s, &w, &mut y)?;
                let ours = wrap(y, dev, (1, n)).to_dtype(DType::F32)?;
                let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
                rows.push((0, n, k, f64::from(diff / scale)));
            }
        }
    }
    Ok(rows)
}

/// The two kernels of a tensor-parallel shard's decode path against host references, on
/// values each output position determines: the vocabulary-sliced embedding (rows outside the
/// slice zero) and the join of gathered logit slices, over rank counts that leave the last
/// slice narrower. `(case, values, mismatches)` per case; exact equality is expected (both
/// only move values).
pub fn shard_kernels_check(device: &Device) -> Result<Vec<(String, usize, usize)>> {
    let dev = cuda_device(device)?;
    let stream = dev.cuda_stream();
    let mut cases = Vec::new();
    let (vocab, n) = (1000usize, 24usize);
    let value = |row: usize, i: usize| bf16::from_f32(((row * 31 + i * 7) % 251) as f32 - 125.0);
    for (first, count) in [(0usize, 1000usize), (0, 334), (334, 334), (668, 332)] {
        let table: Vec<bf16> = (0..count * n)
            .map(|k| value(first + k / n, k % n))
            .collect();
        let table = Tensor::from_vec(table, (count, n), device)?;
        let ids: Vec<u32> = (0..37u32).map(|t| (t * 389 + 11) % vocab as u32).collect();
        let ids_d = stream.clone_htod(&ids).map_err(cuda_err)?;
        let mut out = stream
            .alloc_zeros::<bf16>(ids.len() * n)
            .map_err(cuda_err)?;
        let range = first..first + count;
        embed_rows(dev, &table, &ids_d.slice(..), &mut out, ids.len(), &range)?;
        let got = stream.clone_dtoh(&out).map_err(cuda_err)?;
        let want: Vec<bf16> = ids
            .iter()
            .flat_map(|&id| {
                let held = range.contains(&(id as usize));
                (0..n).map(move |i| {
                    if held {
                        value(id as usize, i)
                    } else {
                        bf16::ZERO
                    }
                })
            })
            .collect();
        let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        cases.push((
            format!("embed_rows vocab {first}..{}", first + count),
            want.len(),
            wrong,
        ));
    }
    for ranks in [1usize, 2, 3] {
        for rows in [1usize, 5] {
            let chunk = vocab.div_ceil(ranks);
            // Rank p's [rows, w_p] slice at the start of its rows x chunk part; the rest of
            // each part is padding the join must not read (NaN here).
            let mut gathered = vec![f32::NAN; ranks * rows * chunk];
            let mut want = vec![0f32; rows * vocab];
            for p in 0..ranks {
                let width = chunk.min(vocab - p * chunk);
                for r in 0..rows {
                    for j in 0..width {
                        let v = (p * 100_000 + r * 1_000 + j) as f32;
                        gathered[p * rows * chunk + r * width + j] = v;
                        want[r * vocab + p * chunk + j] = v;
                    }
                }
            }
            let gathered_d = stream.clone_htod(&gathered).map_err(cuda_err)?;
            let mut out = stream.alloc_zeros::<f32>(rows * vocab).map_err(cuda_err)?;
            join_columns(dev, &gathered_d, &mut out, (rows, vocab, chunk))?;
            let got = stream.clone_dtoh(&out).map_err(cuda_err)?;
            let wrong = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            cases.push((
                format!("join_columns {ranks} ranks, {rows} rows"),
                want.len(),
                wrong,
            ));
        }
    }
    Ok(cases)
}

/// One sequence of a kernel check: its slot list and how many of its last tokens are queries.
#[derive(Debug, Clone)]
pub struct CheckSeq {
    pub slots: Vec<u32>,
    pub n_new: usize,
}

/// FP8 E4M3's nearest value to `x` (saturating at +-448), as the KV write kernel rounds.
pub fn round_to_e4m3(x: f32) -> f32 {
    float8::F8E4M3::from_f32(x).to_f32()
}

/// Runs the attention kernels on host data (rounded to bf16 on the way in; K and V to FP8
/// E4M3 with `kv_dtype` FP8, so a reference should use [`round_to_e4m3`]'s values), for checks
/// against a float reference: q `[rows, heads, d]`, pools `[slots, kv_heads, d]`. With
/// `replayed` (decode rows only), the launch takes the plan a replayed CUDA graph does: fixed
/// splits, each row cutting its own keys ([`replayed_decode_plan`]). `decode_stage_keys` is
/// [`CudaOptions::decode_stage_keys`].
#[allow(clippy::too_many_arguments)]
pub fn attention_on_host(
    device: &Device,
    kernel: AttnKernel,
    replayed: bool,
    decode_stage_keys: usize,
    kv_dtype: KvCacheDtype,
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    seqs: &[CheckSeq],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<Vec<f32>> {
    let dev = cuda_device(device)?;
    let stream = dev.cuda_stream();
    let tuning = DecodeTuning {
        stage_keys: decode_stage_keys,
        kv_dtype,
        ..DecodeTuning::of(&CudaOptions::default())
    };
    let to_bf16 = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
    let q_d = stream.clone_htod(&to_bf16(q)).map_err(cuda_err)?;
    // The pools as the KV write kernel leaves them: bytes of bf16 or FP8 E4M3 elements.
    let pool_bytes = |x: &[f32]| -> Vec<u8> {
        match kv_dtype {
            KvCacheDtype::Bf16 => x
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
            KvCacheDtype::Fp8E4m3 => x
                .iter()
                .map(|&v| float8::F8E4M3::from_f32(v).to_bits())
                .collect(),
        }
    };
    let k_d = stream.clone_htod(&pool_bytes(k_pool)).map_err(cuda_err)?;
    let v_d = stream.clone_htod(&pool_bytes(v_pool)).map_err(cuda_err)?;
    let kv = KvLayer {
        k: &k_d,
        v: &v_d,
        dtype: kv_dtype,
    };
    let rows: usize = seqs.iter().map(|s| s.n_new).sum();
    let dims = AttnDims {
        rows,
        heads,
        kv_heads,
        head_dim,
    };
    if kernel == AttnKernel::TensorCore && !AttnKernel::tensor_core_fits(heads, kv_heads, head_dim)
    {
        return Err(ModelError::Cuda(format!(
            "no tensor-core attention kernel for {heads} heads, {kv_heads} KV heads, head_dim {head_dim}"
        )));
    }
    let lists = SlotLists::build(
        dev,
        seqs.iter().map(|s| (&s.slots[..], s.n_new)),
        dims,
        kernel,
        tuning,
    )?;
    let plan = if replayed {
        if seqs.iter().any(|s| s.n_new != 1) {
            return Err(ModelError::Cuda(
                "a replayed plan takes decode rows only".into(),
            ));
        }
        let max_keys = seqs.iter().map(|s| s.slots.len()).max().unwrap_or(1);
        replayed_decode_plan(kernel, dims, rows, max_keys, tuning)
    } else {
        lists.plan
    };
    let mut parts = AttnPartials::new(dev, rows, heads, head_dim, plan.splits)?;
    // Safety: the merge kernel writes every element.
    let mut out = unsafe { dev.alloc::<bf16>(rows * heads * head_dim) }?;
    let views = lists.views();
    attention(dev, &q_d, kv, &views, &plan, dims, &mut parts, &mut out)?;
    let host: Vec<bf16> = stream.clone_dtoh(&out).map_err(cuda_err)?;
    Ok(host.into_iter().map(f32::from).collect())
}

/// One row of [`linear_bench`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinearBenchRow {
    /// `bf16` (dense, cuBLAS) or a GGUF block format through candle's quantized kernels.
    pub format: String,
    pub batch: usize,
    /// The four linear layers of one transformer layer (QKV, O, gate/up, down).
    pub ms_per_layer: f64,
    /// Weight bytes read per layer over the time: the bandwidth the kernels reach.
    pub weight_gbs: f64,
}

/// Times one layer's linear layers (QKV, O, gate/up, down) of `config`'s shape with random
/// weights, dense bf16 (cuBLAS; and Arbor's GEMV kernel where it applies) against each
/// quantized `format`, for each batch size (rows of activations). Four copies of the layer are cycled so that the weights come from HBM, not
/// the 50 MB L2.
pub fn linear_bench(
    device: &Device,
    config: &ModelConfig,
    formats: &[candle_core::quantized::GgmlDType],
    batches: &[usize],
    iters: usize,
) -> Result<Vec<LinearBenchRow>> {
    use candle_core::quantized::{QMatMul, QStorage, QTensor};
    let dev = cuda_device(device)?;
    let stream = dev.cuda_stream();
    let (h, q, kv, f) = (
        config.hidden_size,
        config.q_dim(),
        config.kv_dim(),
        config.intermediate_size,
    );
    let shapes = [(q + 2 * kv, h), (h, q), (2 * f, h), (h, f)];
    let params: usize = shapes.iter().map(|(o, i)| o * i).sum();
    const COPIES: usize = 4;
    let mut rows = Vec::new();
    // `gemv`: dense layers through Arbor's GEMV kernel (batches it takes only).
    let mut time =
        |layers: &[Vec<GpuLinear>], format: String, bytes: f64, gemv_rows: bool| -> Result<()> {
            for &b in batches {
                if gemv_rows && b > GEMV_MAX_ROWS {
                    continue;
                }
                let x = Tensor::randn(0f32, 1.0, (b, h.max(q).max(f)), device)?
                    .to_dtype(DType::BF16)?;
                let inputs: Vec<Tensor> = shapes
                    .iter()
                    .map(|&(_, i)| x.narrow(1, 0, i).and_then(|t| t.contiguous()))
                    .collect::<candle_core::Result<_>>()?;
                let run = |n: usize| -> Result<()> {
                    for it in 0..n {
                        for (lin, inp) in layers[it % COPIES].iter().zip(&inputs) {
                            match lin {
                                GpuLinear::Dense(w) if gemv_rows => gemv(inp, w)?,
                                _ => lin.forward(inp)?,
                            };
                        }
                    }
                    Ok(())
                };
                run(COPIES)?; // warm-up: kernels loaded, workspaces allocated
                stream.synchronize().map_err(cuda_err)?;
                let t0 = std::time::Instant::now();
                run(iters)?;
                stream.synchronize().map_err(cuda_err)?;
                let per_layer = t0.elapsed().as_secs_f64() / iters as f64;
                rows.push(LinearBenchRow {
                    format: format.clone(),
                    batch: b,
                    ms_per_layer: per_layer * 1e3,
                    weight_gbs: bytes / per_layer / 1e9,
                });
            }
            Ok(())
        };
    // Dense bf16, made on the GPU.
    let dense: Vec<Vec<GpuLinear>> = (0..COPIES)
        .map(|_| {
            shapes
                .iter()
                .map(|&s| {
                    Ok(GpuLinear::Dense(
                        Tensor::randn(0f32, 0.02, s, device)?.to_dtype(DType::BF16)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    time(&dense, "bf16".into(), params as f64 * 2.0, false)?;
    time(&dense, "bf16-gemv".into(), params as f64 * 2.0, true)?;
    drop(dense);
    for &fmt in formats {
        // Quantized once on the CPU; the copies share the bytes, uploaded separately.
        let mut blobs = Vec::new();
        for &s in &shapes {
            let w = Tensor::randn(0f32, 0.02, s, &Device::Cpu)?;
            let qt = QTensor::quantize(&w, fmt)?;
            blobs.push((qt.data()?.into_owned(), s));
        }
        let bytes: usize = blobs.iter().map(|(b, _)| b.len()).sum();
        let layers: Vec<Vec<GpuLinear>> = (0..COPIES)
            .map(|_| {
                blobs
                    .iter()
                    .map(|(data, s)| {
                        let st =
                            QStorage::from_data(std::borrow::Cow::Borrowed(data), device, fmt)?;
                        Ok(GpuLinear::Quantized(QMatMul::from_qtensor(QTensor::new(
                            st, *s,
                        )?)?))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        time(&layers, format!("{fmt:?}"), bytes as f64, false)?;
    }
    Ok(rows)
}

/// The GPU sampler against the CPU sampler's semantics (see
/// `diagnostics::gpu_sampler_checks`): `draws` seeded draws per sampling case compared with
/// the exact distribution by a chi-square test, greedy rows compared token for token,
/// log-probabilities against `TokenLogprob::from_logits`, determinism, and the time of one
/// launch of 64 rows of a 128k vocabulary.
pub fn sampler_checks(device: &Device, draws: usize) -> Result<serde_json::Value> {
    use crate::diagnostics::{chi_square, greedy_cases, sampler_cases, SamplerCase};
    use crate::sampling::TokenLogprob;
    use serde_json::json;
    use std::collections::HashMap;

    const VOCAB: usize = 32_000;
    const ROWS_PER_LAUNCH: usize = 2048;
    let mut sampler = GpuSampler::new(device)?;
    let mut batch = SampleBatch::default();
    let mut failed = 0usize;
    let state_of = SamplerCase::device_state;

    // Seeded draws: one logit row, many sampling rows with consecutive draw counters.
    let mut draw_cases = Vec::new();
    for case in sampler_cases(VOCAB, 7) {
        let logits = Tensor::from_vec(case.logits.clone(), (1, VOCAB), device)?;
        let state = state_of(&case);
        let seed = case.params.seed.unwrap_or(0);
        let mut observed: HashMap<u32, u64> = HashMap::new();
        let started = std::time::Instant::now();
        let mut done = 0;
        while done < draws {
            let n = ROWS_PER_LAUNCH.min(draws - done);
            batch.clear();
            for r in 0..n {
                let draw = (done + r) as u64;
                batch.push(0, &case.params, seed, draw, None, state.adjustments());
            }
            for (t, _) in sampler.sample(&logits, &batch)? {
                *observed.entry(t).or_insert(0) += 1;
            }
            done += n;
        }
        let seconds = started.elapsed().as_secs_f64();
        let expected = case.expected();
        let fit = chi_square(&expected, &observed);
        failed += usize::from(!fit.passes());
        draw_cases.push(json!({
            "case": case.name, "draws": draws, "kept_tokens": expected.len(),
            "distinct_drawn": observed.len(), "chi_square": fit, "ok": fit.passes(),
            "us_per_row": seconds * 1e6 / draws as f64,
        }));
    }

    // Determinism: the same seed and counters give the same tokens.
    let case = &sampler_cases(VOCAB, 7)[4];
    let logits = Tensor::from_vec(case.logits.clone(), (1, VOCAB), device)?;
    let state = state_of(case);
    batch.clear();
    for draw in 0..512u64 {
        batch.push(0, &case.params, 99, draw, None, state.adjustments());
    }
    let first = sampler.sample(&logits, &batch)?;
    let second = sampler.sample(&logits, &batch)?;
    let deterministic = first == second;
    failed += usize::from(!deterministic);

    // Greedy identity and log-probabilities, many rows in one launch.
    let greedy = greedy_cases(VOCAB, 256, 11);
    let flat: Vec<f32> = greedy
        .iter()
        .flat_map(|c| c.logits.iter().copied())
        .collect();
    let logits = Tensor::from_vec(flat, (greedy.len(), VOCAB), device)?;
    batch.clear();
    let states: Vec<SeqSamplingState> = greedy.iter().map(state_of).collect();
    for (r, (case, state)) in greedy.iter().zip(&states).enumerate() {
        let top_n = (r % 2 == 0).then_some(MAX_TOP_LOGPROBS);
        batch.push(r, &case.params, 0, 0, top_n, state.adjustments());
    }
    let got = sampler.sample(&logits, &batch)?;
    let (mut mismatches, mut top_mismatches, mut worst_logprob) = (0usize, 0usize, 0f64);
    for (case, (token, logprob)) in greedy.iter().zip(&got) {
        let want = case
            .cpu_sampler()
            .sample(&mut case.logits.clone(), case.banned());
        mismatches += usize::from(*token != want);
        if let Some(lp) = logprob {
            let reference = TokenLogprob::from_logits(&case.logits, *token, MAX_TOP_LOGPROBS);
            worst_logprob = worst_logprob.max((lp.logprob - reference.logprob).abs() as f64);
            let ids = |t: &TokenLogprob| t.top.iter().map(|e| e.0).collect::<Vec<_>>();
            top_mismatches += usize::from(ids(lp) != ids(&reference));
            for (a, b) in lp.top.iter().zip(&reference.top) {
                worst_logprob = worst_logprob.max((a.1 - b.1).abs() as f64);
            }
        }
    }
    // f64 log-sum-exp on both sides from the same f32 logits: 1e-4 is generous for rounding
    // and far below what a wrong normalization or an off-by-one row would give.
    let logprobs_ok = worst_logprob < 1e-4 && top_mismatches == 0;
    failed += usize::from(mismatches > 0) + usize::from(!logprobs_ok);

    // Structured output: the same rows under random token masks (a quarter of the tokens
    // allowed, the unmasked argmax usually not among them) pick the CPU's masked argmax.
    batch.clear();
    let mut bits = 0x2545_F491_4F6C_DD1Du64;
    let masks: Vec<Vec<u32>> = greedy
        .iter()
        .map(|_| {
            (0..VOCAB.div_ceil(32))
                .map(|_| {
                    bits ^= bits << 13;
                    bits ^= bits >> 7;
                    bits ^= bits << 17;
                    (bits as u32) & ((bits >> 32) as u32)
                })
                .collect()
        })
        .collect();
    for (r, ((case, state), mask)) in greedy.iter().zip(&states).zip(&masks).enumerate() {
        batch.push(r, &case.params, 0, 0, None, state.adjustments());
        batch.push_mask(mask, VOCAB);
    }
    let got = sampler.sample(&logits, &batch)?;
    let mut masked_mismatches = 0usize;
    for ((case, mask), (token, _)) in greedy.iter().zip(&masks).zip(&got) {
        let mut l = case.logits.clone();
        for (t, v) in l.iter_mut().enumerate() {
            if !crate::runner::mask_allows(mask, t as u32) {
                *v = f32::NEG_INFINITY;
            }
        }
        let want = case.cpu_sampler().sample(&mut l, case.banned());
        masked_mismatches +=
            usize::from(*token != want || !crate::runner::mask_allows(mask, *token));
    }
    failed += usize::from(masked_mismatches > 0);

    // Speed: 64 rows of a 128k vocabulary, greedy and with top-p.
    let (rows, vocab) = (64, 128_256);
    let big = Tensor::randn(0f32, 3.0, (rows, vocab), device)?;
    let mut timing = Vec::new();
    for (name, p) in [
        ("greedy", crate::sampling::SamplingParams::greedy()),
        (
            "temperature 0.8, top-p 0.95",
            crate::sampling::SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                ..Default::default()
            },
        ),
        (
            "temperature 1, top-k 50, logprobs 5",
            crate::sampling::SamplingParams {
                temperature: 1.0,
                top_k: 50,
                ..Default::default()
            },
        ),
    ] {
        batch.clear();
        let top_n = name.contains("logprobs").then_some(5);
        for r in 0..rows {
            batch.push(r, &p, 5, 0, top_n, std::iter::empty());
        }
        sampler.sample(&big, &batch)?; // warm-up: buffers and module load
        let started = std::time::Instant::now();
        for _ in 0..20 {
            sampler.sample(&big, &batch)?;
        }
        let ms = started.elapsed().as_secs_f64() * 1e3 / 20.0;
        timing.push(json!({"rows": rows, "vocab": vocab, "params": name, "ms_per_launch": ms}));
    }

    Ok(json!({
        "sampler": "arbor_sample against the CPU sampler (crate::sampling)",
        "vocab": VOCAB,
        "seeded_draws": draw_cases,
        "deterministic": deterministic,
        "greedy": {"rows": greedy.len(), "mismatches": mismatches,
                   "top_logprob_id_mismatches": top_mismatches,
                   "worst_logprob_difference": worst_logprob},
        "masked_greedy": {"rows": greedy.len(), "mismatches": masked_mismatches},
        "timing": timing,
        "failed": failed,
    }))
}
