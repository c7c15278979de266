//! Runs of user-owned tensors: tensors laid back to back in the user's buffers share
//! segments, so a model of many small tensors in one arena costs a few dispatches
//! per step, not two per tensor; and tensors in separate buffers, whose small
//! segments share dispatches unless their buffers clash.

mod common;

use common::{check_step, ctx_with_segments, fixed, inside_sentinels, random, user_buffer};
use half::f16;
use polyak_gpu::{Error, ExternalTensor, Loss, PolyakConfig, PolyakSgd, TensorSpec, VelocityDtype};

const SEGMENT: usize = 64;

/// Lengths of odd sizes that add up to a multiple of 4 (104) and cross segment
/// boundaries of 64 elements inside tensors.
const LENS: [usize; 6] = [3, 10, 7, 33, 1, 50];

/// Tensors `lens` back to back from `p_lead` in `params` and `g_lead` in `grads`.
fn arena(
    lens: &[usize],
    params: &wgpu::Buffer,
    p_lead: u64,
    grads: &wgpu::Buffer,
    g_lead: u64,
) -> Vec<ExternalTensor> {
    let mut at = 0u64;
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            let t = ExternalTensor {
                spec: TensorSpec::new(format!("w{i}"), &[n]),
                params: params.clone(),
                params_offset: p_lead + at,
                grads: grads.clone(),
                grads_offset: g_lead + at,
            };
            at += n as u64 * 4;
            t
        })
        .collect()
}

#[test]
fn an_arena_of_user_tensors_steps_as_one_vector() {
    let ctx = ctx_with_segments(SEGMENT);
    let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment);
    let n: usize = LENS.iter().sum();
    let x0 = random(60, n);
    let (p_lead, g_lead) = (align, 2 * align);
    let params = user_buffer(&ctx, &x0, p_lead);
    let grads = user_buffer(&ctx, &vec![0.0; n], g_lead);
    let cfg = PolyakConfig::default().momentum(0.7).fun_min(-1.0);
    let mut b = PolyakSgd::builder(&ctx, cfg.clone()).tensor(TensorSpec::new("bias", &[5]));
    for t in arena(&LENS, &params, p_lead, &grads, g_lead) {
        b = b.external(t);
    }
    let mut opt = b.build().unwrap();

    // One owned segment and the arena's 104 elements in two (one run per tensor
    // would take six), all three small enough to share one norm and one update
    // dispatch (the norm in one pass at this size: no final sum).
    assert_eq!(opt.buffers().layout().segment_lens(), &[8, 64, 40]);
    assert_eq!(opt.dispatches_per_step(), 2);
    let w5 = opt.buffers().layout().tensor("w5").unwrap();
    assert_eq!(
        w5.parts.len(),
        2,
        "w5 (54..104) crosses the segment boundary"
    );
    assert_eq!(opt.buffers().params_bindings("w5").unwrap().len(), 2);

    // Tensors move whole, wherever they lie in the segments.
    let mut at = 0;
    for (i, &len) in LENS.iter().enumerate() {
        let name = format!("w{i}");
        assert_eq!(
            opt.buffers().download_tensor(&name).unwrap(),
            x0[at..at + len]
        );
        at += len;
    }
    let t5 = random(61, LENS[5]);
    opt.buffers().upload_tensor("w5", &t5).unwrap();
    assert_eq!(opt.buffers().download_tensor("w5").unwrap(), t5);
    opt.buffers().upload_tensor("w5", &x0[54..]).unwrap();

    // Two steps against f64, over the bias and every tensor of the arena.
    let total = 5 + n;
    let mut p0 = vec![0.0; 5];
    p0.extend(&x0);
    let (g1, g2) = (random(62, total), random(63, total));
    let state = opt.init_state(fixed(&g1, 3.0)).unwrap();
    let (state, p1, v1) = check_step(&mut opt, &state, &p0, &vec![0.0; total], &g1, 3.0);
    let (_, p2, _) = check_step(&mut opt, &state, &p1, &v1, &g2, 1.0);

    // Updated in place in the user's buffer; the bytes around the arena untouched.
    assert_eq!(inside_sentinels(&ctx, &params, p_lead, n), p2[5..]);
    inside_sentinels(&ctx, &grads, g_lead, n);
}

#[test]
fn runs_are_checked_as_a_whole() {
    let ctx = ctx_with_segments(SEGMENT);
    let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment);
    let params = user_buffer(&ctx, &random(64, 256), 2 * align);
    let grads = user_buffer(&ctx, &random(65, 256), 2 * align);
    let build = |tensors: Vec<ExternalTensor>| {
        tensors
            .into_iter()
            .fold(PolyakSgd::builder(&ctx, PolyakConfig::default()), |b, t| {
                b.external(t)
            })
            .build()
    };
    let reason = |r: polyak_gpu::Result<PolyakSgd>| match r {
        Err(Error::Registration { tensor, reason }) => format!("{tensor}: {reason}"),
        other => panic!("expected a registration error, got {other:?}"),
    };
    assert!(build(arena(&[3, 5], &params, align, &grads, 0)).is_ok());
    // 3 + 6 elements: not whole vec4s; named by the run's first tensor
    let why = reason(build(arena(&[3, 6], &params, align, &grads, 0)));
    assert!(
        why.starts_with("w0: with the 1 tensors after it back to back, the length 9"),
        "{why}"
    );
    // the run's start must be aligned, in both buffers
    let why = reason(build(arena(&[4], &params, align + 16, &grads, 0)));
    assert!(why.contains("params offset"), "{why}");
    let why = reason(build(arena(&[4], &params, align, &grads, 4)));
    assert!(why.contains("grads offset"), "{why}");
    // back to back in the parameters only: two runs, the second one unaligned
    let mut t = arena(&[4, 4], &params, align, &grads, 0);
    t[1].grads_offset = align;
    let why = reason(build(t.clone()));
    assert!(why.starts_with("w1: params offset"), "{why}");
    // ... fine where each run starts aligned, one segment each
    t[1].grads_offset = 2 * align;
    t[1].params_offset = 3 * align;
    let opt = build(t).unwrap();
    assert_eq!(opt.buffers().layout().segment_lens(), &[4, 4]);
    // a run in other buffers starts over
    let other = user_buffer(&ctx, &random(66, 64), 0);
    let mut t = arena(&[4, 4], &params, align, &grads, 0);
    t[1].params = other.clone();
    t[1].params_offset = 0;
    t[1].grads_offset = 16;
    let why = reason(build(t));
    assert!(why.starts_with("w1: grads offset 16"), "{why}");
}

#[test]
fn an_f16_velocity_of_odd_tensors_in_a_run_keeps_its_neighbours() {
    // Inside a run, tensors start at odd elements: their f16 velocity begins and
    // ends mid-word, where copies move whole 4-byte words.
    let ctx = ctx_with_segments(SEGMENT);
    let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment);
    let n: usize = LENS.iter().sum();
    let params = user_buffer(&ctx, &random(70, n), align);
    let grads = user_buffer(&ctx, &random(71, n), 0);
    let cfg = PolyakConfig::default()
        .momentum(0.9)
        .velocity_dtype(VelocityDtype::F16);
    let mut opt = arena(&LENS, &params, align, &grads, 0)
        .into_iter()
        .fold(PolyakSgd::builder(&ctx, cfg), |b, t| b.external(t))
        .build()
        .unwrap();
    // f16 values, so that the round trip is exact
    let v: Vec<f32> = random(72, n)
        .iter()
        .map(|&x| f16::from_f32(x).to_f32())
        .collect();
    opt.buffers().upload_velocity(&v).unwrap();
    assert_eq!(opt.download_velocity().unwrap().unwrap(), v);

    // A checkpoint writes and reads each tensor's f16 velocity on its own.
    let file = std::env::temp_dir().join(format!("polyak-runs-{}.safetensors", std::process::id()));
    let state = opt.init_state(|_| Ok((Loss::Host(1.0), ()))).unwrap(); // zeroes v
    opt.buffers().upload_velocity(&v).unwrap();
    opt.save_checkpoint(&state, &file).unwrap();
    opt.buffers().upload_velocity(&vec![0.5; n]).unwrap();
    opt.load_checkpoint(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(opt.download_velocity().unwrap().unwrap(), v);
}

#[test]
fn the_benchmark_fill_covers_a_run_whole() {
    // Tensors inside a run start at offsets no storage binding may take: the fill
    // binds the run's segments instead, and leaves the owned tensor's gaps alone.
    let ctx = ctx_with_segments(SEGMENT);
    let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment);
    let n: usize = LENS.iter().sum();
    let params = user_buffer(&ctx, &vec![0.0; n], align);
    let grads = user_buffer(&ctx, &vec![0.0; n], 0);
    let opt = arena(&LENS, &params, align, &grads, 0)
        .into_iter()
        .fold(
            PolyakSgd::builder(&ctx, PolyakConfig::default()).tensor(TensorSpec::new("b", &[6])),
            |b, t| b.external(t),
        )
        .build()
        .unwrap();
    polyak_gpu::bench::fill(&opt, true, 3, 0.5).unwrap();
    let p = opt.download_params().unwrap();
    // "b": its first 4 elements filled, the last 6 % 4 kept (zero)
    assert!(p[..4].iter().all(|x| x.abs() <= 0.5 && *x != 0.0), "{p:?}");
    assert_eq!(p[4..6], [0.0, 0.0]);
    assert!(p[6..].iter().all(|x| x.abs() <= 0.5 && *x != 0.0), "{p:?}");
    // the bytes around the arena in the user's buffer untouched
    inside_sentinels(&ctx, &params, align, n);
}

#[test]
fn tensors_that_swap_buffers_never_share_a_dispatch() {
    // "a" has its parameters in x and its gradient in y, "b" the other way round:
    // in one dispatch x and y would each be bound writable and read-only, which
    // wgpu refuses, so the two small segments go in separate dispatches.
    let ctx = ctx_with_segments(SEGMENT);
    let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment);
    let (p_a, p_b) = (random(80, 32), random(81, 32));
    // where the other tensor's vector starts in each buffer: past 32 f32s, aligned
    let second = 128u64.next_multiple_of(align);
    let at = second as usize / 4;
    let mut x_data = p_a.clone();
    x_data.resize(at + 32, 0.0);
    let mut y_data = vec![0.0; at];
    y_data.extend(&p_b);
    let (x, y) = (user_buffer(&ctx, &x_data, 0), user_buffer(&ctx, &y_data, 0));
    let t =
        |name: &str, params: &wgpu::Buffer, p_off, grads: &wgpu::Buffer, g_off| ExternalTensor {
            spec: TensorSpec::new(name, &[32]),
            params: params.clone(),
            params_offset: p_off,
            grads: grads.clone(),
            grads_offset: g_off,
        };
    let cfg = PolyakConfig::default().momentum(0.5).fun_min(-1.0);
    let mut opt = PolyakSgd::builder(&ctx, cfg)
        .external(t("a", &x, 0, &y, 0))
        .external(t("b", &y, second, &x, second))
        .build()
        .unwrap();
    // one norm dispatch (it binds both read-only; one pass at this size, with the
    // final sum), two updates
    assert_eq!(opt.dispatches_per_step(), 1 + 2);
    let p0 = [p_a, p_b].concat();
    assert_eq!(opt.download_params().unwrap(), p0);
    let (g1, g2) = (random(82, 64), random(83, 64));
    let state = opt.init_state(fixed(&g1, 2.0)).unwrap();
    let (state, p1, v1) = check_step(&mut opt, &state, &p0, &vec![0.0; 64], &g1, 2.0);
    check_step(&mut opt, &state, &p1, &v1, &g2, 1.0);
}
