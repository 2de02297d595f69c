//! weave's GGUF dequantizer and packed CPU matrices against llama.cpp's own decoding of the
//! same bytes: random blocks of every storage type weave reads, decoded by the `gguf` Python
//! package (llama.cpp's gguf-py) into `tests/fixtures/ggml_blocks.json`
//! (`tools/golden/ggml_blocks.py` makes it).

use serde_json::Value;
use weave::model::blocks::dequantize;
use weave::model::gguf::GgmlType;
use weave::model::packed::QMatrix;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

struct Case {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    want: Vec<f32>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/ggml_blocks.json"))
        .expect("tests/fixtures/ggml_blocks.json");
    let v: Value = serde_json::from_str(&text).expect("fixture is JSON");
    v["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .map(|b| {
            let ty = GgmlType::from_u32(b["ggml_type"].as_u64().expect("ggml_type") as u32);
            assert_eq!(ty.name(), b["type"].as_str().unwrap(), "the fixture's type number names its type");
            let want = hex(b["want_f32_hex"].as_str().unwrap())
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            Case {
                ty,
                rows: b["rows"].as_u64().unwrap() as usize,
                cols: b["cols"].as_u64().unwrap() as usize,
                data: hex(b["data_hex"].as_str().unwrap()),
                want,
            }
        })
        .collect()
}

/// Every type, value for value: the same products in the same order as gguf-py, so equal.
#[test]
fn dequantizer_equals_llama_cpps() {
    let cases = cases();
    let names: Vec<String> = cases.iter().map(|c| c.ty.name()).collect();
    assert_eq!(names, ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]);
    for c in &cases {
        let mut got = vec![f32::NAN; c.rows * c.cols];
        dequantize(c.ty, &c.data, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&c.want).enumerate() {
            assert!(
                g == w,
                "{} element {i} (row {}, column {}): weave {g}, llama.cpp {w}",
                c.ty.name(),
                i / c.cols,
                i % c.cols
            );
        }
    }
}

/// The packed CPU layout holds the same weights, to one rounding (it folds a block's
/// offset into one fused multiply-add); the types it cannot hold say so.
#[test]
fn packed_matrices_hold_llama_cpps_weights() {
    for c in cases() {
        let Some(m) = QMatrix::from_ggml(c.ty, c.rows, c.cols, &c.data) else {
            assert_eq!(c.ty, GgmlType::Q6_K, "{} should pack", c.ty.name());
            continue;
        };
        let mut row = vec![0f32; c.cols];
        for r in 0..c.rows {
            m.dequant_row(r, &mut row);
            for (k, (g, w)) in row.iter().zip(&c.want[r * c.cols..]).enumerate() {
                assert!((g - w).abs() <= 1e-6 * w.abs(), "{} row {r} [{k}]: packed {g}, llama.cpp {w}", c.ty.name());
            }
        }
    }
}
