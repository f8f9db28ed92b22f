//! Reading the lake's JSON text columns (`categories`, `custom`,
//! `noise_scale`) row by row without building a document per row.
//!
//! The label and custom-feature detectors read one such text per row of
//! the lake, so this is their hot loop. Here object keys are borrowed from
//! the text (copied only when they hold escapes), numbers go straight into
//! the caller's buffer, and members nobody asked for are skipped without
//! being built. A row that is not valid JSON of the expected shape yields
//! nothing, as a whole (the caller's buffer is left empty).
//!
//! [`Texts`] reads a text column as stored (`Utf8View`, `Utf8` or
//! `LargeUtf8`), so no column is copied into another text type first.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use datafusion::arrow::array::{Array, AsArray, LargeStringArray, StringArray, StringViewArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{exec_err, Result};
use datafusion::logical_expr::{Signature, TypeSignature, Volatility};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Arrow's text types, in the order a signature offers them.
pub const TEXT_TYPES: [DataType; 3] = [DataType::Utf8View, DataType::Utf8, DataType::LargeUtf8];

/// A signature of `n` text arguments, each in any of Arrow's text types,
/// so that columns reach the function as stored instead of being cast to
/// `Utf8` value by value first.
pub fn texts_signature(n: usize) -> Signature {
    let mut lists: Vec<Vec<DataType>> = vec![vec![]];
    for _ in 0..n {
        lists = lists
            .into_iter()
            .flat_map(|list| {
                TEXT_TYPES.iter().map(move |t| {
                    let mut list = list.clone();
                    list.push(t.clone());
                    list
                })
            })
            .collect();
    }
    Signature::one_of(
        lists.into_iter().map(TypeSignature::Exact).collect(),
        Volatility::Immutable,
    )
}

/// A text column as stored, read row by row.
pub enum Texts<'a> {
    View(&'a StringViewArray),
    Utf8(&'a StringArray),
    Large(&'a LargeStringArray),
}

impl<'a> Texts<'a> {
    pub fn new(array: &'a dyn Array) -> Result<Self> {
        Ok(match array.data_type() {
            DataType::Utf8View => Texts::View(array.as_string_view()),
            DataType::Utf8 => Texts::Utf8(array.as_string::<i32>()),
            DataType::LargeUtf8 => Texts::Large(array.as_string::<i64>()),
            other => return exec_err!("expected a text column, got {other}"),
        })
    }

    pub fn len(&self) -> usize {
        match self {
            Texts::View(a) => a.len(),
            Texts::Utf8(a) => a.len(),
            Texts::Large(a) => a.len(),
        }
    }

    /// Row `i`, `None` when NULL.
    pub fn get(&self, i: usize) -> Option<&'a str> {
        match self {
            Texts::View(a) => a.is_valid(i).then(|| a.value(i)),
            Texts::Utf8(a) => a.is_valid(i).then(|| a.value(i)),
            Texts::Large(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

/// The numeric members of the object `text`, or of its member `field`
/// (`{"label": {"billing": 21, "cancel": 9}}` with field `label`), into
/// `out` (cleared first). Members that are not numbers are skipped; a
/// missing `field` gives none. False, with `out` empty, when `text` is
/// not such an object.
pub fn numbers<'a>(text: &'a str, field: Option<&str>, out: &mut Vec<(Cow<'a, str>, f64)>) -> bool {
    out.clear();
    let mut de = serde_json::Deserializer::from_str(text);
    let members = Members(&mut *out);
    let parsed = match field {
        Some(name) => Member {
            name,
            seed: Some(members),
        }
        .deserialize(&mut de),
        None => members.deserialize(&mut de),
    }
    .and_then(|()| de.end());
    if parsed.is_err() {
        out.clear();
    }
    parsed.is_ok()
}

/// The number at member `key` of the object `text` (e.g. a noise scale
/// from `noise_scale`); `None` when absent, not a number or not JSON.
pub fn number(text: &str, key: &str) -> Option<f64> {
    let mut found = None;
    let mut de = serde_json::Deserializer::from_str(text);
    Member {
        name: key,
        seed: Some(Found(&mut found)),
    }
    .deserialize(&mut de)
    .and_then(|()| de.end())
    .ok()?;
    found
}

/// Histograms of one `custom` text,
/// `{"feature": {"edges": [...], "counts": [...]}}`, laid out flat so
/// that one buffer serves every row.
#[derive(Debug, Default)]
pub struct Histograms<'a> {
    features: Vec<(Cow<'a, str>, Range<usize>, Range<usize>)>,
    values: Vec<f64>,
}

impl<'a> Histograms<'a> {
    /// Reads `text` (forgetting the previous row). False, with nothing
    /// read, when it is not such an object.
    pub fn read(&mut self, text: &'a str) -> bool {
        self.features.clear();
        self.values.clear();
        let mut de = serde_json::Deserializer::from_str(text);
        let parsed = (&mut *self).deserialize(&mut de).and_then(|()| de.end());
        if parsed.is_err() {
            self.features.clear();
            self.values.clear();
        }
        parsed.is_ok()
    }

    /// Each feature: its name, edges and counts.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[f64], &[f64])> {
        self.features.iter().map(|(name, edges, counts)| {
            (
                name.as_ref(),
                &self.values[edges.clone()],
                &self.values[counts.clone()],
            )
        })
    }
}

// ---- serde plumbing ----------------------------------------------------

/// An object key, borrowed from the text unless it holds escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// Any JSON value: its number, `None` for anything else (read past).
struct Number(Option<f64>);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NumberVisitor;
        impl<'de> Visitor<'de> for NumberVisitor {
            type Value = Number;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Number, E> {
                Ok(Number(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Number, E> {
                Ok(Number(Some(v as f64)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Number, E> {
                Ok(Number(Some(v as f64)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Number, E> {
                Ok(Number(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Number, E> {
                Ok(Number(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Number, E> {
                Ok(Number(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Number, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Number(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Number, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Number(None))
            }
        }
        d.deserialize_any(NumberVisitor)
    }
}

/// Reads member `name` of an object with `seed`, skipping the others
/// (the first of duplicate members counts).
struct Member<'n, S> {
    name: &'n str,
    seed: Option<S>,
}

impl<'de, S: DeserializeSeed<'de, Value = ()>> DeserializeSeed<'de> for Member<'_, S> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, S: DeserializeSeed<'de, Value = ()>> Visitor<'de> for Member<'_, S> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(key)) = map.next_key()? {
            match self.seed.take_if(|_| key == self.name) {
                Some(seed) => map.next_value_seed(seed)?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// An object's numeric members, appended to a buffer.
struct Members<'o, 'de>(&'o mut Vec<(Cow<'de, str>, f64)>);

impl<'de> DeserializeSeed<'de> for Members<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Members<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of counts")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(key)) = map.next_key()? {
            if let Number(Some(n)) = map.next_value()? {
                self.0.push((key, n));
            }
        }
        Ok(())
    }
}

/// One number, kept.
struct Found<'o>(&'o mut Option<f64>);

impl<'de> DeserializeSeed<'de> for Found<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        *self.0 = Number::deserialize(d)?.0;
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for &mut Histograms<'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for &mut Histograms<'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of histograms")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(name)) = map.next_key()? {
            let (edges, counts) = map.next_value_seed(Histogram(&mut self.values))?;
            self.features.push((name, edges, counts));
        }
        Ok(())
    }
}

/// One histogram object: where its edges and counts went in the buffer.
struct Histogram<'o>(&'o mut Vec<f64>);

impl<'de> DeserializeSeed<'de> for Histogram<'_> {
    type Value = (Range<usize>, Range<usize>);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Histogram<'_> {
    type Value = (Range<usize>, Range<usize>);
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a histogram object with edges and counts")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut edges, mut counts) = (0..0, 0..0);
        while let Some(Key(key)) = map.next_key()? {
            let target = match key.as_ref() {
                "edges" => &mut edges,
                "counts" => &mut counts,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            let start = self.0.len();
            map.next_value_seed(Numbers(&mut *self.0))?;
            *target = start..self.0.len();
        }
        Ok((edges, counts))
    }
}

/// An array's numbers appended to a buffer (other elements skipped).
struct Numbers<'o>(&'o mut Vec<f64>);

impl<'de> DeserializeSeed<'de> for Numbers<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Numbers<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of numbers")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(Number(n)) = seq.next_element()? {
            self.0.extend(n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_of_a_field_skip_the_rest() {
        let mut out = Vec::new();
        let text = r#"{"intent": {"x": 1}, "label": {"billing": 21, "can\"cel": -9.5, "odd": "n/a", "nested": {"a": 1}}, "z": [1, 2]}"#;
        assert!(numbers(text, Some("label"), &mut out));
        assert_eq!(
            out,
            vec![
                (Cow::Borrowed("billing"), 21.0),
                (Cow::Borrowed("can\"cel"), -9.5)
            ]
        );
        // Borrowed unless escaped.
        assert!(matches!(out[0].0, Cow::Borrowed(_)));
        assert!(matches!(out[1].0, Cow::Owned(_)));
        assert!(numbers(text, Some("missing"), &mut out));
        assert!(out.is_empty());
        assert!(numbers(r#"{"a": 1, "b": 2.5}"#, None, &mut out));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn bad_rows_yield_nothing() {
        let mut out = vec![(Cow::Borrowed("stale"), 1.0)];
        for bad in [
            "",
            "not json",
            r#"{"label": {"a": 1}"#,
            r#"{"label": {"a": 1}} trailing"#,
            r#"{"label": 5}"#,
            r#"[1, 2]"#,
            r#"{"label": {"a": 1, "b": }}"#,
        ] {
            assert!(!numbers(bad, Some("label"), &mut out), "{bad}");
            assert!(out.is_empty(), "{bad}");
        }
        let mut h = Histograms::default();
        assert!(!h.read(r#"{"f": {"edges": [0, 1], "counts": [1, oops]}}"#));
        assert_eq!(h.iter().count(), 0);
        assert!(!h.read(r#"{"f": 3}"#));
    }

    #[test]
    fn one_number_by_key() {
        let scales = r#"{"latency_ms": 2.5, "categories.label": 4, "custom.x": null}"#;
        assert_eq!(number(scales, "categories.label"), Some(4.0));
        assert_eq!(number(scales, "latency_ms"), Some(2.5));
        assert_eq!(number(scales, "custom.x"), None);
        assert_eq!(number(scales, "absent"), None);
        assert_eq!(number("{", "latency_ms"), None);
    }

    #[test]
    fn histograms_of_every_feature() {
        let mut h = Histograms::default();
        let text = r#"{"brightness": {"edges": [0, 0.5, 1], "counts": [3, -1], "extra": {"k": [1]}}, "size": {"counts": [7]}}"#;
        assert!(h.read(text));
        let got: Vec<_> = h.iter().collect();
        assert_eq!(
            got,
            vec![
                ("brightness", &[0.0, 0.5, 1.0][..], &[3.0, -1.0][..]),
                ("size", &[][..], &[7.0][..]),
            ]
        );
        // The next row replaces the previous one.
        assert!(h.read(r#"{"size": {"edges": [1], "counts": [2]}}"#));
        assert_eq!(h.iter().count(), 1);
    }

    #[test]
    fn texts_read_every_text_type() {
        use std::sync::Arc;
        let values = [Some("a"), None, Some("a longer value than twelve bytes")];
        let arrays: Vec<Arc<dyn Array>> = vec![
            Arc::new(StringViewArray::from(values.to_vec())),
            Arc::new(StringArray::from(values.to_vec())),
            Arc::new(LargeStringArray::from(values.to_vec())),
        ];
        for array in &arrays {
            let texts = Texts::new(array.as_ref()).expect("text");
            let got: Vec<_> = (0..texts.len()).map(|i| texts.get(i)).collect();
            assert_eq!(got, values.to_vec());
        }
        let ints = datafusion::arrow::array::Int32Array::from(vec![1]);
        assert!(Texts::new(&ints).is_err());
        match texts_signature(2).type_signature {
            TypeSignature::OneOf(lists) => assert_eq!(lists.len(), 9),
            other => panic!("{other:?}"),
        }
    }
}
