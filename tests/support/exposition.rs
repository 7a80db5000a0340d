//! A strict parser of the Prometheus text exposition format (version
//! 0.0.4): metric names, quoted label values with escapes, special float
//! values and optional timestamps. Any malformed line is an error, so a
//! test reading /metrics through it also checks the format.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow, bail};

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// `# TYPE` declarations by family name.
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    pub fn parse(text: &str) -> Result<Self> {
        let mut out = Self::default();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                        bail!("line {}: malformed TYPE: {line}", number + 1);
                    };
                    out.types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            out.samples.push(parse_sample(line).map_err(|e| anyhow!("line {}: {e}: {line}", number + 1))?);
        }
        Ok(out)
    }

    /// The value of the sample named `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.value)
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':') {
        i += 1;
    }
    if i == 0 || bytes[0].is_ascii_digit() {
        bail!("bad metric name");
    }
    let name = line[..i].to_owned();
    let mut labels = BTreeMap::new();
    if bytes.get(i) == Some(&b'{') {
        i += 1;
        loop {
            if bytes.get(i) == Some(&b'}') {
                i += 1;
                break;
            }
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            if start == i {
                bail!("bad label name");
            }
            let key = line[start..i].to_owned();
            if bytes.get(i) != Some(&b'=') || bytes.get(i + 1) != Some(&b'"') {
                bail!("expected =\" after label {key}");
            }
            i += 2;
            let mut value = String::new();
            loop {
                match bytes.get(i) {
                    None => bail!("unterminated label value"),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        match bytes.get(i + 1) {
                            Some(b'\\') => value.push('\\'),
                            Some(b'"') => value.push('"'),
                            Some(b'n') => value.push('\n'),
                            _ => bail!("bad escape in label value"),
                        }
                        i += 2;
                    }
                    Some(_) => {
                        let rest = &line[i..];
                        let c = rest.chars().next().ok_or_else(|| anyhow!("bad UTF-8"))?;
                        value.push(c);
                        i += c.len_utf8();
                    }
                }
            }
            if labels.insert(key.clone(), value).is_some() {
                bail!("label {key} repeated");
            }
            match bytes.get(i) {
                Some(b',') => i += 1,
                Some(b'}') => {}
                _ => bail!("expected , or }} after a label"),
            }
        }
    }
    let rest = line[i..].trim_start();
    if rest.len() == line.len() - i {
        bail!("no space before the value");
    }
    let mut parts = rest.split_whitespace();
    let value = match parts.next().ok_or_else(|| anyhow!("no value"))? {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        number => number.parse::<f64>().map_err(|e| anyhow!("bad value: {e}"))?,
    };
    if let Some(timestamp) = parts.next() {
        timestamp.parse::<i64>().map_err(|e| anyhow!("bad timestamp: {e}"))?;
    }
    if parts.next().is_some() {
        bail!("trailing text");
    }
    Ok(Sample { name, labels, value })
}
