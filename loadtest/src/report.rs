//! A scenario's figures, printed as a table or as one JSON object per run. Holds no logic
//! about what the figures mean; compare.sh computes ratios from the JSON.

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

/// One measured figure.
pub struct Figure {
    /// Stable key (JSON field name).
    pub name: String,
    /// The value, in `unit`.
    pub value: f64,
    /// Unit, for the table.
    pub unit: &'static str,
}

/// What one scenario run produced.
pub struct Report {
    /// Scenario name (`bulk`, `rr`, ...).
    pub scenario: &'static str,
    /// Path label (`direct`, `tether-unix`, `haproxy`, ...).
    pub path: String,
    /// Figures in print order.
    pub figures: Vec<Figure>,
    /// Remarks printed under the table (and as `notes` in JSON).
    pub notes: Vec<String>,
}

impl Report {
    /// An empty report.
    pub fn new(scenario: &'static str, path: &str) -> Report {
        Report {
            scenario,
            path: path.to_owned(),
            figures: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Add a figure.
    pub fn add(&mut self, name: impl Into<String>, value: f64, unit: &'static str) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit,
        });
    }

    /// The value of figure `name`, if the report has it.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
    }

    /// Add p50/p90/p99/p999/max of a microsecond histogram, named `{prefix}_p50_us`...
    pub fn latency(&mut self, prefix: &str, hist: &Histogram<u64>) {
        for (q, label) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p999")] {
            self.add(
                format!("{prefix}_{label}_us"),
                hist.value_at_quantile(q) as f64,
                "µs",
            );
        }
        self.add(format!("{prefix}_max_us"), hist.max() as f64, "µs");
    }

    /// Print as a JSON object on one line.
    pub fn print_json(&self) {
        let mut figures = Map::new();
        for f in &self.figures {
            figures.insert(f.name.clone(), json!(f.value));
        }
        let out = json!({
            "scenario": self.scenario,
            "path": self.path,
            "figures": Value::Object(figures),
            "notes": self.notes,
        });
        println!("{out}");
    }

    /// Print as an aligned table.
    pub fn print_table(&self) {
        println!("{} via {}", self.scenario, self.path);
        let width = self.figures.iter().map(|f| f.name.len()).max().unwrap_or(0);
        for f in &self.figures {
            let value = if f.value.fract() == 0.0 || f.value.abs() >= 100.0 {
                format!("{:.0}", f.value)
            } else {
                format!("{:.3}", f.value)
            };
            println!("  {:width$}  {:>14} {}", f.name, value, f.unit);
        }
        for n in &self.notes {
            println!("  note: {n}");
        }
    }
}
