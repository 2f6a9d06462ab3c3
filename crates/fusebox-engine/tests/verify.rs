//! Multi-token scoring (speculative verify) against one-token decode steps:
//! on the CPU every row of a verify pass is bitwise the logits a decode step
//! at that position gives, and rolling the KV cache back then decoding
//! gives the same logits as never having run the rejected tokens.

mod common;

use common::{assert_verify_rows_equal_steps, cpu, load, tokens, ALL_MODELS};
use fusebox_engine::Session;

#[test]
fn verify_rows_equal_decode_steps_bitwise() {
    let be = cpu();
    for name in ALL_MODELS {
        let model = load(name, &be);
        let vocab = model.config().vocab_size;
        let prompt = tokens(7, vocab, 11);
        for m in [1usize, 2, 5, 17] {
            let run = tokens(m, vocab, 100 + m as u64);
            assert_verify_rows_equal_steps(&model.decoder, &be, name, &prompt, &run, 64, 1);
        }
    }
}

#[test]
fn rollback_then_decode_equals_never_running_the_rejected_tokens() {
    let be = cpu();
    for name in ["tiny-qwen3", "gguf/tiny-llama.gguf", "mlx/tiny-qwen3-moe-4bit-g64"] {
        let model = load(name, &be);
        let vocab = model.config().vocab_size;
        let prompt = tokens(5, vocab, 3);
        let run = tokens(6, vocab, 4);
        let other = tokens(3, vocab, 5);
        // reference: prompt, run[..2], then `other` one step at a time
        let mut a = Session::new(&model.decoder, &be, 64).unwrap();
        a.prefill(&prompt).unwrap();
        a.step(run[0]).unwrap();
        a.step(run[1]).unwrap();
        let want: Vec<Vec<f32>> = other.iter().map(|&t| a.step(t).unwrap().to_vec()).collect();
        // verify all six, keep two, then the same steps
        let mut b = Session::new(&model.decoder, &be, 64).unwrap();
        b.prefill(&prompt).unwrap();
        b.verify(&run).unwrap();
        b.truncate(prompt.len() + 2);
        assert_eq!(b.kv.len, prompt.len() + 2);
        assert_eq!(b.tokens.len(), prompt.len() + 2);
        let got: Vec<Vec<f32>> = other.iter().map(|&t| b.step(t).unwrap().to_vec()).collect();
        assert!(got == want, "{name}: decoding after a rollback differs");
        // and a verify pass after a rollback, too
        b.truncate(prompt.len() + 2);
        b.verify(&other).unwrap();
        let rows = b.verify_logits().unwrap().to_vec();
        for (i, w) in want.iter().enumerate() {
            assert!(rows[i * vocab..(i + 1) * vocab] == w[..], "{name}: verify after rollback, row {i}");
        }
    }
}

#[test]
fn verify_errors_are_clear() {
    let be = cpu();
    let model = load("tiny-qwen3", &be);
    let mut s = Session::new(&model.decoder, &be, 8).unwrap();
    s.prefill(&[1, 2, 3, 4, 5, 6]).unwrap();
    let e = s.verify(&[1, 2, 3]).unwrap_err().to_string();
    assert!(e.contains("do not fit in the context"), "{e}");
    let e = s.verify(&[]).unwrap_err().to_string();
    assert!(e.contains("no tokens"), "{e}");
    let mut fresh = Session::new(&model.decoder, &be, 8).unwrap();
    let e = fresh.verify_logits().unwrap_err().to_string();
    assert!(e.contains("no verify pass"), "{e}");
}
