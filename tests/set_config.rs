//! `PolyakSgd::set_config`: options changed between updates act as an optimizer
//! built with them and resumed from a checkpoint; what the buffers and kernels fix
//! is refused and changes nothing.

mod common;

use common::{bits, ctx, fixed, random};
use polyak_gpu::{
    Error, NonFinitePolicy, ParamDtype, PolyakConfig, PolyakSgd, State, StepSizeMode, Variant,
    VelocityDtype,
};

const N: usize = 37;

/// Updates `k` in `steps` from `state` on fixed gradients.
fn updates(opt: &mut PolyakSgd, mut state: State, steps: std::ops::Range<u64>) -> State {
    for k in steps {
        let g = random(100 + k, N);
        state = opt.update(&state, fixed(&g, 2.0 + k as f64)).unwrap();
    }
    state
}

#[test]
fn new_options_act_as_an_optimizer_built_with_them() {
    let ctx = ctx();
    let p0 = random(1, N);
    let file = std::env::temp_dir().join(format!(
        "polyak-set-config-{}.safetensors",
        std::process::id()
    ));
    for (mode, deferred, check) in [
        (StepSizeMode::Host, false, false),
        (StepSizeMode::Host, true, false),
        (StepSizeMode::Device, false, false),
        (StepSizeMode::Device, false, true),
    ] {
        let before = PolyakConfig::default()
            .momentum(0.9)
            .stepsize_mode(mode)
            .check_overflow(check);
        // Every option that may change, changed.
        let afters = [
            before
                .clone()
                .momentum(0.5)
                .max_stepsize(0.01)
                .fun_min(-0.5)
                .delta(0.1),
            before
                .clone()
                .variant(Variant::SpsPlus) // uncapped: above the SPS_max cap of 1 here
                .fun_min(-20.0)
                .nonfinite(NonFinitePolicy::Skip)
                .tol(1e-9)
                .maxiter(7),
        ];
        for after in afters {
            let what = format!("{mode:?} deferred {deferred}: {after:?}");
            let mut a = PolyakSgd::new(&ctx, before.clone(), &p0).unwrap();
            a.set_deferred_updates(deferred).unwrap();
            let s = a.init_state(fixed(&random(99, N), 1.0)).unwrap();
            let s = updates(&mut a, s, 0..3);
            a.set_config(after.clone()).unwrap();
            assert_eq!(a.config(), &after, "{what}");
            // A deferred update still pending ran with the old options.
            let mut twin = PolyakSgd::new(&ctx, before.clone(), &p0).unwrap();
            let t = twin.init_state(fixed(&random(99, N), 1.0)).unwrap();
            assert_eq!(updates(&mut twin, t, 0..3), s, "{what}");
            assert!(bits(&a) == bits(&twin), "{what}");
            a.save_checkpoint(&s, &file).unwrap();
            let mut b = PolyakSgd::new(&ctx, after.clone(), &p0).unwrap();
            let mut c = PolyakSgd::new(&ctx, before.clone(), &p0).unwrap();
            let (sb, sc) = (
                b.load_checkpoint(&file).unwrap(),
                c.load_checkpoint(&file).unwrap(),
            );
            let (sa, sb, sc) = (
                updates(&mut a, s, 3..6),
                updates(&mut b, sb, 3..6),
                updates(&mut c, sc, 3..6),
            );
            assert_eq!(sa, sb, "{what}");
            assert!(bits(&a) == bits(&b), "{what}");
            // and not as the old options would have it
            assert_ne!(sa.stepsize, sc.stepsize, "{what}");
            assert!(bits(&a) != bits(&c), "{what}");
            let _ = std::fs::remove_file(&file);
        }
    }
}

#[test]
fn what_the_buffers_fix_is_refused_and_changes_nothing() {
    let ctx = ctx();
    let built = PolyakConfig::default()
        .momentum(0.9)
        .stepsize_mode(StepSizeMode::Device)
        .sync_every(8);
    let mut opt = PolyakSgd::new(&ctx, built.clone(), &random(2, N)).unwrap();
    let base = || built.clone();
    for (option, config) in [
        ("dtype", base().dtype(ParamDtype::F64)),
        ("momentum", base().momentum(0.0)),
        ("velocity_dtype", base().velocity_dtype(VelocityDtype::F16)),
        ("check_overflow", base().check_overflow(true)),
        ("sync_every", base().sync_every(9)),
        ("max_stepsize", base().max_stepsize(-1.0)), // out of its domain
    ] {
        match opt.set_config(config) {
            Err(Error::InvalidOption { option: o, .. }) => assert_eq!(o, option),
            other => panic!("{option}: {other:?}"),
        }
        assert_eq!(opt.config(), &built, "{option}");
    }
    // No momentum at build: none may come later.
    let mut plain = PolyakSgd::new(&ctx, PolyakConfig::default(), &random(3, N)).unwrap();
    let refused = plain.set_config(PolyakConfig::default().momentum(0.5));
    assert!(
        matches!(
            refused,
            Err(Error::InvalidOption {
                option: "momentum",
                ..
            })
        ),
        "{refused:?}"
    );

    // Fewer steps per wait, and back to the built number, are fine; a pipelined
    // run then does what it did.
    let run = |opt: &mut PolyakSgd| {
        let batches = 0..12u64;
        let f = |ev: &mut polyak_gpu::Evaluation<'_>, b: &u64| fixed(&random(50 + b, N), 1.5)(ev);
        opt.run_iterator(f, batches).unwrap()
    };
    let mut twin = PolyakSgd::new(&ctx, built.clone(), &random(2, N)).unwrap();
    opt.set_config(built.clone().sync_every(3)).unwrap();
    opt.set_config(built.clone().sync_every(8)).unwrap();
    let (s, t) = (run(&mut opt), run(&mut twin));
    assert_eq!(s.iter_num, 11);
    assert_eq!(s, t);
    assert!(bits(&opt) == bits(&twin));
}
