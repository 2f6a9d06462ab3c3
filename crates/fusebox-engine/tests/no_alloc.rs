//! The decode step allocates nothing once warm: the property that lets a
//! device backend capture it as a graph. A counting global allocator sees
//! every allocation in the process, worker threads included.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use fusebox_core::{cpu::CpuBackend, fixtures::fixture};
use fusebox_engine::{
    BatchEngine, DFlash, DraftModel, GenerateOptions, PromptLookup, Proposer, Request, SamplingParams, Session,
    SpecOptions, Speculation,
};
use fusebox_models::dflash::DFlashDraft;
use fusebox_models::Model;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counter sees the whole process: the tests take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn decode_steps_do_not_allocate() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for name in ["tiny-qwen3", "tiny-llama"] {
        let be = CpuBackend::new(2).unwrap();
        let model = Model::load(&fixture(name), &be).unwrap();
        let mut s = Session::new(&model.decoder, &be, 256).unwrap();
        s.prefill(&[1, 2, 3, 4]).unwrap();
        // warm-up: thread-local scratch grows to its working size
        for t in 0..40 {
            s.step(t).unwrap();
        }
        s.reset();
        s.prefill(&[1, 2, 3, 4]).unwrap();
        // Measured inside one `run`, so that the CPU pool's job injector
        // (which allocates a block per 63 jobs sent from outside the pool)
        // is out of the picture and only fusebox's own code is counted.
        let counts = up_to_three_windows(|| {
            s.reset();
            s.prefill(&[1, 2, 3, 4]).unwrap();
            let mut n = 0;
            fusebox_core::Backend::run(&be, &mut || {
                let before = ALLOCS.load(Ordering::SeqCst);
                for t in 0..40 {
                    s.step(t)?;
                }
                n = ALLOCS.load(Ordering::SeqCst) - before;
                Ok(())
            })
            .unwrap();
            n
        });
        assert_eq!(counts.last(), Some(&0), "{name}: allocations in windows of 40 decode steps: {counts:?}");
        // the sampled decode step (the forward pass and the sampling op) too
        s.reset();
        s.prefill(&[1, 2, 3, 4]).unwrap();
        let p = sampled();
        s.set_sampling(&p).unwrap();
        let mut t = 5;
        for _ in 0..20 {
            t = s.decode(t).unwrap();
        }
        let counts = up_to_three_windows(|| {
            let mut n = 0;
            fusebox_core::Backend::run(&be, &mut || {
                let before = ALLOCS.load(Ordering::SeqCst);
                for _ in 0..40 {
                    t = s.decode(t)?;
                }
                n = ALLOCS.load(Ordering::SeqCst) - before;
                Ok(())
            })
            .unwrap();
            n
        });
        assert_eq!(counts.last(), Some(&0), "{name}: allocations in windows of 40 sampled decode steps: {counts:?}");
    }
}

/// Sampling with every filter and the repetition penalty on.
fn sampled() -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        min_p: 0.02,
        repeat_penalty: 1.1,
        repeat_last_n: 64,
        seed: 1,
    }
}

/// Count allocations in up to three windows, stopping at the first with none.
/// An allocation in fusebox's decode path recurs every step, so it shows in
/// every window; a one-off growth of the thread pool's internal queues (seen
/// once on a loaded CI machine) does not recur.
fn up_to_three_windows(mut window: impl FnMut() -> usize) -> Vec<usize> {
    let mut counts = vec![];
    for _ in 0..3 {
        counts.push(window());
        if counts.last() == Some(&0) {
            break;
        }
    }
    counts
}

/// The engine's steps for one request at a time (what `generate` runs): a
/// decode step allocates nothing once warm, greedy and sampled.
#[test]
fn lone_engine_decode_steps_do_not_allocate() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let be = CpuBackend::new(2).unwrap();
    let model = Model::load(&fixture("tiny-qwen3"), &be).unwrap();

    for sampling in [SamplingParams::greedy(), sampled()] {
        let mut engine = BatchEngine::lone(&model.decoder, &be, 512).unwrap();
        let req =
            |n| Request { prompt: vec![1, 2, 3, 4], max_new_tokens: n, stop_ids: vec![], sampling: sampling.clone() };
        let mut events = Vec::with_capacity(8);
        // warm-up: a request longer than the measured one, so that the sampling op's scratch (per
        // pool thread, sized by the context) has reached its working size on every thread
        engine.add(req(300)).unwrap();
        while !engine.is_idle() {
            engine.step_into(&mut events).unwrap();
        }
        engine.add(req(200)).unwrap();
        for _ in 0..20 {
            engine.step_into(&mut events).unwrap();
        }
        let counts = up_to_three_windows(|| {
            let mut n = 0;
            fusebox_core::Backend::run(&be, &mut || {
                let before = ALLOCS.load(Ordering::SeqCst);
                for _ in 0..40 {
                    engine.step_into(&mut events)?;
                }
                n = ALLOCS.load(Ordering::SeqCst) - before;
                Ok(())
            })
            .unwrap();
            n
        });
        assert_eq!(counts.last(), Some(&0), "allocations in windows of 40 engine decode steps: {counts:?}");
    }
}

/// Allocations of one speculative generation of `n` tokens through the
/// engine, counted inside one `run`.
fn engine_spec_allocs<'m>(
    be: &CpuBackend,
    engine: &mut BatchEngine<'m>,
    spec: &mut Option<Speculation<'m>>,
    prompt: &[u32],
    n: usize,
) -> usize {
    let opts = GenerateOptions { max_new_tokens: n, stop_ids: vec![], sampling: SamplingParams::greedy() };
    let mut count = 0;
    fusebox_core::Backend::run(be, &mut || {
        let before = ALLOCS.load(Ordering::SeqCst);
        let (out, _) = engine.generate(prompt, &opts, spec, |_| Ok(true))?;
        count = ALLOCS.load(Ordering::SeqCst) - before;
        assert_eq!(out.tokens.len(), n);
        Ok(())
    })
    .unwrap();
    count
}

/// The engine's speculative rounds (propose, score, accept) allocate
/// nothing once warm: a generation of 200 tokens allocates no more than one
/// of 60.
#[test]
fn engine_speculative_rounds_do_not_allocate() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let be = CpuBackend::new(2).unwrap();
    let model = Model::load(&fixture("tiny-qwen3"), &be).unwrap();
    let other = Model::load(&fixture("tiny-llama"), &be).unwrap();
    let p: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 500).collect();
    let prompt = [&p[..], &p[..], &p[..6]].concat();
    for method in ["ngram", "draft", "dflash"] {
        let proposer: Box<dyn Proposer> = match method {
            "ngram" => Box::new(PromptLookup::new(3).unwrap()),
            "draft" => Box::new(DraftModel::new(&model, &other, &be, 512).unwrap()),
            _ => {
                let df = DFlashDraft::load(&fixture("tiny-dflash"), &be).unwrap();
                Box::new(DFlash::new(df, &model.decoder, &be, 512).unwrap())
            }
        };
        let mut spec = Some(Speculation { options: SpecOptions { k: 4, trace: false }, proposer });
        let mut engine = BatchEngine::lone(&model.decoder, &be, 512).unwrap();
        engine_spec_allocs(&be, &mut engine, &mut spec, &prompt, 200);
        engine_spec_allocs(&be, &mut engine, &mut spec, &prompt, 200);
        let counts = up_to_three_windows(|| {
            let short = engine_spec_allocs(&be, &mut engine, &mut spec, &prompt, 60);
            let long = engine_spec_allocs(&be, &mut engine, &mut spec, &prompt, 200);
            long.saturating_sub(short)
        });
        assert_eq!(counts.last(), Some(&0), "{method}: allocations that grow with the rounds: {counts:?}");
    }
}
