//! The task: E2E-NLG-style data-to-text, generated. A meaning representation
//! (`name[Aromi], eatType[pub], food[Thai], area[riverside], familyFriendly[no]`) becomes one
//! sentence in a fixed house style that the model cannot guess before training. This echoes the
//! LoRA paper's E2E NLG experiment (its Table 3) with made-up data, not the real data set.
//! Held-out examples use restaurant names never seen in training.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;

const TRAIN_NAMES: &[&str] = &[
    "The Eagle",
    "Alimentum",
    "Aromi",
    "Bibimbap House",
    "Blue Spice",
    "Clowns",
    "Cocum",
    "Cotto",
    "Fitzbillies",
    "Giraffe",
    "Green Man",
    "Loch Fyne",
    "Midsummer House",
    "Strada",
    "Zizzi",
    "Taste of Cambridge",
    "The Cambridge Blue",
    "The Cricketers",
    "The Dumpling Tree",
    "Wildwood",
    "The Golden Curry",
    "The Mill",
    "The Olive Grove",
    "The Phoenix",
    "The Plough",
    "The Punter",
];
const HELD_OUT_NAMES: &[&str] = &[
    "The Rice Boat",
    "The Vaults",
    "The Waterman",
    "Browns Cambridge",
    "The Wrestlers",
    "Travellers Rest Beefeater",
    "The Twenty Two",
    "Cotto Verde",
];
const FOODS: &[&str] = &[
    "French", "Italian", "Chinese", "Indian", "Japanese", "English", "Thai",
];
const EAT_TYPES: &[&str] = &["restaurant", "pub", "coffee shop"];
const PRICES: &[(&str, &str)] = &[
    ("cheap", "low"),
    ("moderate", "mid-range"),
    ("high", "premium"),
];
const AREAS: &[&str] = &["riverside", "city centre"];

/// The system prompt of every conversation (short: the template's default costs ~20 tokens).
pub(crate) const SYSTEM: &str = "Describe the restaurant in one sentence.";

/// One example: the meaning representation and the reference sentence.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) input: String,
    pub(crate) output: String,
}

fn record(rng: &mut StdRng, names: &[&str]) -> Record {
    let name = *names.choose(rng).unwrap_or(&"Aromi");
    let eat = *EAT_TYPES.choose(rng).unwrap_or(&"pub");
    let food = *FOODS.choose(rng).unwrap_or(&"Thai");
    let area = *AREAS.choose(rng).unwrap_or(&"riverside");
    let (price, tier) = *PRICES.choose(rng).unwrap_or(&("cheap", "low"));
    let family = rng.random_bool(0.5);
    let input = format!(
        "name[{name}], eatType[{eat}], food[{food}], priceRange[{price}], area[{area}], familyFriendly[{}]",
        if family { "yes" } else { "no" }
    );
    // The house style: a fixed order and wording the base model has no reason to produce.
    let output = format!(
        "{name} is a {eat} serving {food} food at {tier} prices in the {area}. {}",
        if family {
            "Kids are welcome."
        } else {
            "It is not for kids."
        }
    );
    Record { input, output }
}

/// `n` training records and `m` held-out records (unseen names), reproducible from `seed`.
pub(crate) fn make(seed: u64, n: usize, m: usize) -> (Vec<Record>, Vec<Record>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let train = (0..n).map(|_| record(&mut rng, TRAIN_NAMES)).collect();
    let held_out = (0..m).map(|_| record(&mut rng, HELD_OUT_NAMES)).collect();
    (train, held_out)
}

/// The records as chat JSONL (`{"messages": [...]}`), what `lora train --data` reads.
pub(crate) fn jsonl(records: &[Record]) -> String {
    records
        .iter()
        .map(|r| {
            json!({"messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": r.input},
                {"role": "assistant", "content": r.output},
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

/// [`make`]s the task and writes it as the JSONL files `lora train --data` / `--eval` read,
/// `out/train.jsonl` and `out/held_out.jsonl`: returns their paths and the held-out records.
pub(crate) fn write_task(
    out: &Path,
    seed: u64,
    n: usize,
    m: usize,
) -> std::io::Result<(PathBuf, PathBuf, Vec<Record>)> {
    let (train, held_out) = make(seed, n, m);
    let (train_path, eval_path) = (out.join("train.jsonl"), out.join("held_out.jsonl"));
    std::fs::write(&train_path, jsonl(&train))?;
    std::fs::write(&eval_path, jsonl(&held_out))?;
    Ok((train_path, eval_path, held_out))
}
