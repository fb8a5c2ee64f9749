//! The data: a character-level vocabulary, a pre-training corpus, the E2E-style task and batches.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

const PAD: u32 = 0;
const BOS: u32 = 1;
const EOS: u32 = 2;
const CHARS: &str = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,[]=>-'";

fn encode(s: &str) -> Vec<u32> {
    s.chars()
        .map(|c| CHARS.find(c).map_or(3, |i| i as u32 + 4))
        .collect()
}

/// Characters plus the four special tokens (padding, start, end, unknown).
pub(crate) fn vocab_size() -> usize {
    CHARS.len() + 4
}

const NAMES: &[&str] = &[
    "Aromi",
    "Cotto",
    "Zizzi",
    "The Mill",
    "Giraffe",
    "Alimentum",
    "Loch Fyne",
    "Wildwood",
    "Fitzbillies",
    "The Phoenix",
    "Strada",
    "Green Man",
    "The Punter",
    "Clowns",
    "The Vaults",
    "Blue Spice",
    "The Eagle",
    "Browns",
    "The Wrestlers",
    "Taste of Cambridge",
    "The Golden Curry",
    "Bibimbap",
    "The Olive Grove",
    "The Rice Boat",
    "Cocum",
    "The Cricketers",
    "Midsummer",
    "The Dumpling Tree",
];
/// Names kept out of the adaptation's training split.
const HELD_OUT_NAMES: usize = 6;
const FOODS: &[&str] = &[
    "French", "Italian", "Chinese", "Indian", "Japanese", "English", "Thai", "Spanish",
];
const AREAS: &[&str] = &["riverside", "city centre"];
const PRICES: &[&str] = &["cheap", "moderately priced", "expensive"];

/// One E2E-style example: the meaning representation and its (deterministic) sentence.
fn e2e_example(rng: &mut StdRng, names: &[&str]) -> (String, String) {
    let name = *names.choose(rng).unwrap_or(&"Aromi");
    let food = *FOODS.choose(rng).unwrap_or(&"Thai");
    let area = *AREAS.choose(rng).unwrap_or(&"riverside");
    let price = rng
        .random_bool(0.5)
        .then(|| *PRICES.choose(rng).unwrap_or(&"cheap"));
    let family = rng.random_bool(0.5).then(|| rng.random_bool(0.5));
    let mut mr = format!("name[{name}] food[{food}] area[{area}]");
    let mut sentence = match price {
        Some(p) => {
            mr.push_str(&format!(" price[{p}]"));
            format!("{name} is a {p} {food} restaurant in the {area}.")
        }
        None => format!("{name} serves {food} food in the {area}."),
    };
    if let Some(f) = family {
        mr.push_str(&format!(" family[{}]", if f { "yes" } else { "no" }));
        sentence.push_str(if f {
            " It is family friendly."
        } else {
            " It is not family friendly."
        });
    }
    (mr, sentence)
}

/// Pre-training text: plain sentences, with names repeated inside a line so the model learns to
/// copy words it has not seen before.
fn corpus_line(rng: &mut StdRng) -> String {
    const WHO: &[&str] = &[
        "Anna",
        "Tom",
        "the farmer",
        "a child",
        "my friend",
        "the cook",
        "Lena",
        "Omar",
        "the teacher",
    ];
    const VERB: &[&str] = &[
        "likes", "sees", "makes", "finds", "wants", "sells", "eats", "paints", "visits",
    ];
    const WHAT: &[&str] = &[
        "bread",
        "a red boat",
        "the old house",
        "fresh fish",
        "green tea",
        "a small dog",
        "the city",
        "warm soup",
        "the river",
    ];
    const WHERE: &[&str] = &[
        "in the park",
        "near the river",
        "in the city centre",
        "at home",
        "by the sea",
        "in the morning",
    ];
    let word: String = (0..rng.random_range(4..9))
        .map(|i| {
            let c = rng.random_range(b'a'..=b'z') as char;
            if i == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    let food = *FOODS.choose(rng).unwrap_or(&"Thai");
    let area = *AREAS.choose(rng).unwrap_or(&"riverside");
    let price = *PRICES.choose(rng).unwrap_or(&"cheap");
    match rng.random_range(0..9) {
        4 => format!(
            "{} likes {food} food, and the {area} is nice.",
            WHO.choose(rng).unwrap_or(&"Tom")
        ),
        // The sentences of the downstream task occur as plain text (with made-up names); the
        // meaning-representation format and the mapping are what adaptation has to learn.
        5 => e2e_example(rng, &[word.as_str()]).1,
        6 => format!("We ate in the {area}. The place is family friendly and not {price}."),
        7 => format!("{word} is a small restaurant in the {area}, and {word} is {price}."),
        // Bracketed key[value] notes, as in lists and tables on the web: the syntax of the
        // meaning representations, though never with the task's keys.
        8 => format!(
            "note[{word}] item[{}] => {word} has {}.",
            WHAT.choose(rng).unwrap_or(&"bread"),
            WHAT.choose(rng).unwrap_or(&"bread")
        ),
        0 => format!(
            "{} {} {} {}.",
            WHO.choose(rng).unwrap_or(&"Tom"),
            VERB.choose(rng).unwrap_or(&"likes"),
            WHAT.choose(rng).unwrap_or(&"bread"),
            WHERE.choose(rng).unwrap_or(&"at home")
        ),
        1 => format!(
            "The place is called {word}. People go to {word} {}.",
            WHERE.choose(rng).unwrap_or(&"at home")
        ),
        2 => format!(
            "{word} {} {}, and {word} is happy.",
            VERB.choose(rng).unwrap_or(&"likes"),
            WHAT.choose(rng).unwrap_or(&"bread")
        ),
        _ => format!(
            "I met {word} {}. {word} {} {}.",
            WHERE.choose(rng).unwrap_or(&"at home"),
            VERB.choose(rng).unwrap_or(&"likes"),
            WHAT.choose(rng).unwrap_or(&"bread")
        ),
    }
}

/// A tokenised sequence and the index from which its tokens count in the loss.
pub(crate) struct Sequence {
    ids: Vec<u32>,
    loss_from: usize,
}

fn task_sequence(mr: &str, sentence: &str) -> Sequence {
    let mut ids = vec![BOS];
    ids.extend(encode(mr));
    ids.extend(encode(" => "));
    let loss_from = ids.len() - 1; // predict the first sentence token from the last prompt token
    ids.extend(encode(sentence));
    ids.push(EOS);
    Sequence { ids, loss_from }
}

fn corpus_sequence(line: &str) -> Sequence {
    let mut ids = vec![BOS];
    ids.extend(encode(line));
    ids.push(EOS);
    Sequence { ids, loss_from: 0 }
}

/// The splits: pre-training text, then the task's train and validation splits (seen names) and
/// its held-out split (unseen names).
pub(crate) struct Data {
    pub(crate) pretrain: Vec<Sequence>,
    pub(crate) train: Vec<Sequence>,
    pub(crate) valid: Vec<Sequence>,
    pub(crate) held_out: Vec<Sequence>,
}

/// Generates every split from `seed`; `quick` makes them tiny.
pub(crate) fn make_data(seed: u64, quick: bool) -> Data {
    let mut rng = StdRng::seed_from_u64(seed);
    let (seen, unseen) = NAMES.split_at(NAMES.len() - HELD_OUT_NAMES);
    let n = if quick { 64 } else { 2000 };
    let pretrain = (0..n * 2)
        .map(|_| corpus_sequence(&corpus_line(&mut rng)))
        .collect();
    let mut task = |names: &[&str], k: usize| -> Vec<Sequence> {
        (0..k)
            .map(|_| {
                let (mr, s) = e2e_example(&mut rng, names);
                task_sequence(&mr, &s)
            })
            .collect()
    };
    let train = task(seen, n);
    let valid = task(seen, if quick { 16 } else { 128 });
    let held_out = task(unseen, if quick { 16 } else { 256 });
    Data {
        pretrain,
        train,
        valid,
        held_out,
    }
}

/// A padded batch: inputs `[b, t]`, targets `[b, t]`, loss mask `[b, t]`.
pub(crate) struct Batch {
    pub(crate) inputs: Tensor,
    pub(crate) targets: Tensor,
    pub(crate) mask: Tensor,
}

/// Pads `seqs` to the longest (at most `ctx` tokens); targets are the inputs shifted by one.
pub(crate) fn batch(seqs: &[&Sequence], ctx: usize) -> Result<Batch> {
    let t = seqs
        .iter()
        .map(|s| s.ids.len() - 1)
        .max()
        .unwrap_or(1)
        .min(ctx);
    let (mut inputs, mut targets, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for s in seqs {
        for i in 0..t {
            let has = i + 1 < s.ids.len();
            inputs.push(if i < s.ids.len() { s.ids[i] } else { PAD });
            targets.push(if has { s.ids[i + 1] } else { PAD });
            mask.push(if has && i >= s.loss_from { 1f32 } else { 0.0 });
        }
    }
    let b = seqs.len();
    let dev = Device::Cpu;
    Ok(Batch {
        inputs: Tensor::from_vec(inputs, (b, t), &dev)?,
        targets: Tensor::from_vec(targets, (b, t), &dev)?,
        mask: Tensor::from_vec(mask, (b, t), &dev)?,
    })
}
