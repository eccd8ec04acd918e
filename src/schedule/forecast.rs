//! TaylorSeer forecasting (`forecast = "taylor"`, `order` 1 or 2): on a skipped step, the cached
//! residual is extrapolated from the last computed ones instead of reused as it is (cache-dit's
//! TaylorSeer calibrator, research spec §11.5; diffusers' `taylorseer_cache.py` forecasts the same
//! way, spec §6).
//!
//! cache-dit's calibrator, per branch, with its step `c` = the sampler's step − 1:
//!
//! ```text
//! update(Y) on a computed step:  prev = F; w = c - last; F = [Y, ...];
//!     for i < order: if prev[i] exists and c > 1: F[i+1] = (F[i] - prev[i]) / w  else stop
//!     last = c
//! forecast on a skipped step:     e = c - last;  Y ≈ Σ_i F[i] e^i / i!   (up to the first missing F)
//! ```
//!
//! With a static table the steps of every update are known at conversion, so each forecast is a
//! fixed linear combination of the last `order + 1` computed residuals: [`coefficients`] gives, per
//! step, the weights of the newest, the previous, ... residual (the graph keeps those residuals as
//! state and applies the weights it gathers at the step). A residual that is exactly linear in the
//! step is forecast exactly by order 1 (once two updates exist). A quadratic one is not forecast
//! exactly by order 2: cache-dit's differences are backward differences used as Taylor derivatives
//! (`e^i / i!`), which hold only in the limit of small spacing; order 2 is closer than order 1 (the
//! tests work one case out by hand).
//!
//! Policies that decide in the graph (`easy-cache`, `ada-cache`, `first-block-cache`) do not know the
//! steps of their computed calls at conversion: [`emit_weights`] computes the same weights in the
//! graph from the steps of the last `order + 1` computed calls, kept as state ([`UPDATE_STEPS`]),
//! and a count of computed calls; the policy's reuse branch applies them as the table policies do.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::ir::{AttrValue, DataType, Node};
use crate::passes::broadcast_adaptive::FORECAST_WEIGHTS;
use crate::passes::STEP_INPUT;
use crate::schedule::emitter::Emitter;
use crate::schedule::first_block_cache::DECISION;

/// `forecast` and `order`, options of every `broadcast-adaptive` policy that bakes a table.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Taylor {
    pub order: usize,
}

impl Taylor {
    /// Take `forecast` and `order` out of a policy's options: None without `forecast`.
    pub fn take_from(options: &mut toml::Table) -> Result<Option<Taylor>> {
        let order = options.remove("order");
        let Some(forecast) = options.remove("forecast") else {
            if order.is_some() {
                bail!("broadcast-adaptive.order is the order of a forecast: give forecast = \"taylor\" with it");
            }
            return Ok(None);
        };
        match forecast.as_str() {
            Some("taylor") => {}
            _ => bail!("broadcast-adaptive.forecast must be \"taylor\" (the only forecast there is), got {forecast}"),
        }
        let order = match order {
            None => 1,
            Some(toml::Value::Integer(n @ 1..=2)) => n as usize,
            Some(other) => bail!("broadcast-adaptive.order must be 1 or 2, got {other}"),
        };
        Ok(Some(Taylor { order }))
    }
}

/// Per step, the weights of the last `order + 1` computed residuals (newest first) whose sum
/// forecasts the residual at that step, for a branch that computes where `compute` is true. Computed
/// steps get no weights (all zero): the graph computes there. A skipped step before any second
/// update has only the newest residual: weight 1 on it, plain reuse.
pub fn coefficients(compute: &[bool], taylor: Taylor) -> Vec<Vec<f64>> {
    let width = taylor.order + 1;
    // Factors as weights over the stored residuals, newest first.
    let mut factors: Vec<Option<Vec<f64>>> = vec![None; width];
    let mut last: Option<i64> = None;
    let mut out = Vec::with_capacity(compute.len());
    for (s, &computes) in compute.iter().enumerate() {
        let c = s as i64 - 1;
        if computes {
            // The stored residuals shift by one: an old factor's weights move one place older.
            let prev: Vec<Option<Vec<f64>>> = factors
                .iter()
                .map(|f| {
                    f.as_ref().map(|w| {
                        let mut shifted = vec![0.0; width];
                        shifted[1..].copy_from_slice(&w[..width - 1]);
                        shifted
                    })
                })
                .collect();
            let mut fresh: Vec<Option<Vec<f64>>> = vec![None; width];
            let mut newest = vec![0.0; width];
            newest[0] = 1.0;
            fresh[0] = Some(newest);
            let spacing = last.map(|l| (c - l) as f64);
            for i in 0..taylor.order {
                match (&prev[i], &fresh[i], spacing) {
                    (Some(p), Some(f), Some(w)) if c > 1 => {
                        fresh[i + 1] = Some(f.iter().zip(p).map(|(a, b)| (a - b) / w).collect());
                    }
                    _ => break,
                }
            }
            factors = fresh;
            last = Some(c);
            out.push(vec![0.0; width]);
        } else {
            let e = last.map_or(0, |l| c - l) as f64;
            let mut weights = vec![0.0; width];
            let mut term = 1.0; // e^i / i!
            for (i, f) in factors.iter().enumerate() {
                let Some(f) = f else { break };
                if i > 0 {
                    term *= e / i as f64;
                }
                for (w, x) in weights.iter_mut().zip(f) {
                    *w += term * x;
                }
            }
            out.push(weights);
        }
    }
    out
}

/// State values of a policy that forecasts in the graph: the steps of its newest, previous and
/// older computed calls (int64 scalars, newest first; `order + 1` of them).
pub const UPDATE_STEPS: [&str; 3] = ["update_step", "update_step.1", "update_step.2"];

/// A count of computed calls (int64 scalar state), for a policy that keeps none of its own.
pub const COMPUTED_CALLS: &str = "computed_calls";

/// The states [`emit_weights`] reads besides the count: the update steps of `order`.
pub fn update_step_states(order: usize) -> Vec<(&'static str, (DataType, Vec<i64>))> {
    UPDATE_STEPS[..=order]
        .iter()
        .map(|v| (*v, (DataType::I64, Vec::new())))
        .collect()
}

/// `calls_out = calls_in + 1` on a computed call (`ditc.decision`), else `calls_in`.
pub fn emit_call_count(e: &mut Emitter, calls_in: &str, calls_out: &str) {
    let one = e.i64("fc_count_one", 1);
    let plus_one = e.op("Add", "fc_count_plus_one", &[calls_in, &one]);
    e.named("Where", &[DECISION, &plus_one, calls_in], calls_out);
}

/// `ditc.forecast.weights` (f32 `[order + 1]`, newest residual first) from the steps of the last
/// computed calls, as [`crate::schedule::forecast::coefficients`] gives them for a static table
/// (cache-dit's calibrator: a difference only from the second update on and where that update's
/// `c = step - 1 > 1`), and the update steps' state outputs (shifted on a computed call).
///
/// With `s0 > s1 > s2` the steps of the newest updates, `w = s0 - s1`, `v = s1 - s2`, `e = step - s0`:
/// `F1 = (Y0 - Y1) / w`, `F2 = (F1 - (Y1 - Y2) / v) / w`, forecast `Y0 + a F1 + b F2` with
/// `a = e` where F1 exists and `b = e^2 / 2` where F2 exists, else 0.
///
/// `calls` is the state input counting the branch's computed calls before this one; `state_in` and
/// `state_out` name the policy's state values ([`UPDATE_STEPS`] among them); the decision is
/// `ditc.decision` (true: this call computes).
pub fn emit_weights(
    e: &mut Emitter,
    order: usize,
    calls: &str,
    state_in: fn(&str) -> String,
    state_out: fn(&str) -> String,
) {
    let cast = |e: &mut Emitter, name: &str, v: &str| e.cast(name, v, DataType::F32);
    let steps: Vec<String> = UPDATE_STEPS[..=order].iter().map(|v| state_in(v)).collect();
    let (two, three) = (e.i64("fc_two", 2), e.i64("fc_three", 3));
    let one_f = e.f32("fc_one", 1.0);
    let zero_f = e.f32("fc_zero", 0.0);
    let elapsed = e.op("Sub", "fc_elapsed", &[STEP_INPUT, &steps[0]]);
    let elapsed = cast(e, "fc_elapsed_f32", &elapsed);
    // F1 exists: two updates, the newest at c > 1 (step > 2).
    let two_updates = e.op("GreaterOrEqual", "fc_two_updates", &[calls, &two]);
    let newest_late = e.op("Greater", "fc_newest_late", &[&steps[0], &two]);
    let has_f1 = e.op("And", "fc_has_f1", &[&two_updates, &newest_late]);
    let spacing = e.op("Sub", "fc_spacing", &[&steps[0], &steps[1]]);
    let spacing = cast(e, "fc_spacing_f32", &spacing);
    let w = e.op("Where", "fc_w", &[&has_f1, &spacing, &one_f]);
    let a = e.op("Where", "fc_a", &[&has_f1, &elapsed, &zero_f]);
    let a_w = e.op("Div", "fc_a_over_w", &[&a, &w]);
    let mut weights = vec![
        e.op("Add", "fc_weight_0", &[&one_f, &a_w]),
        e.op("Neg", "fc_weight_1", &[&a_w]),
    ];
    if order == 2 {
        // F2 exists: F1 exists and existed at the previous update (three updates, it at c > 1).
        let three_updates = e.op("GreaterOrEqual", "fc_three_updates", &[calls, &three]);
        let previous_late = e.op("Greater", "fc_previous_late", &[&steps[1], &two]);
        let earlier = e.op("And", "fc_f1_before", &[&three_updates, &previous_late]);
        let has_f2 = e.op("And", "fc_has_f2", &[&has_f1, &earlier]);
        let older = e.op("Sub", "fc_older_spacing", &[&steps[1], &steps[2]]);
        let older = cast(e, "fc_older_spacing_f32", &older);
        let v = e.op("Where", "fc_v", &[&has_f2, &older, &one_f]);
        let half = e.f32("fc_half", 0.5);
        let square = e.op("Mul", "fc_elapsed_squared", &[&elapsed, &elapsed]);
        let half_square = e.op("Mul", "fc_half_square", &[&square, &half]);
        let b = e.op("Where", "fc_b", &[&has_f2, &half_square, &zero_f]);
        // b F2 = b / w * ((Y0 - Y1) / w - (Y1 - Y2) / v).
        let b_w = e.op("Div", "fc_b_over_w", &[&b, &w]);
        let b_ww = e.op("Div", "fc_b_over_ww", &[&b_w, &w]);
        let b_wv = e.op("Div", "fc_b_over_wv", &[&b_w, &v]);
        let w0 = e.op("Add", "fc_weight_0_2", &[&weights[0], &b_ww]);
        let both = e.op("Add", "fc_b_sum", &[&b_ww, &b_wv]);
        let w1 = e.op("Sub", "fc_weight_1_2", &[&weights[1], &both]);
        weights = vec![w0, w1, b_wv];
    }
    let shape = e.i64s("fc_one_element", &[1]);
    let parts: Vec<String> = weights
        .iter()
        .enumerate()
        .map(|(j, w)| e.op("Reshape", &format!("fc_part_{j}"), &[w, &shape]))
        .collect();
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    e.nodes.push(
        Node::new(FORECAST_WEIGHTS, "Concat", &refs, &[FORECAST_WEIGHTS])
            .with_attr("axis", AttrValue::Int(0)),
    );
    // Shift the update steps on a computed call.
    for j in (0..=order).rev() {
        let newer = if j == 0 {
            STEP_INPUT.to_string()
        } else {
            steps[j - 1].clone()
        };
        e.named(
            "Where",
            &[DECISION, &newer, &steps[j]],
            &state_out(UPDATE_STEPS[j]),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forecast of `r(s)` at every skipped step from the residuals of the computed ones.
    fn forecasts(compute: &[bool], order: usize, r: impl Fn(f64) -> f64) -> Vec<(usize, f64, f64)> {
        let coef = coefficients(compute, Taylor { order });
        let mut history: Vec<f64> = Vec::new(); // newest first
        let mut out = Vec::new();
        for (s, &computes) in compute.iter().enumerate() {
            if computes {
                history.insert(0, r(s as f64));
                history.truncate(order + 1);
            } else {
                let got: f64 = coef[s].iter().zip(&history).map(|(w, x)| w * x).sum();
                out.push((s, got, r(s as f64)));
            }
        }
        out
    }

    #[test]
    fn order_one_forecasts_a_linear_residual_exactly() {
        // Computes at 0, 1, 2, 4, 6, 9 (uneven spacing): from the second update at step >= 3 on,
        // every skipped step is forecast exactly.
        // Step 3 comes before the second update with a derivative (cache-dit's `c > 1`): reuse.
        let compute = [
            true, true, true, false, true, false, true, false, false, true, false,
        ];
        for (s, got, want) in forecasts(&compute, 1, |s| 3.0 - 0.5 * s) {
            if s > 4 {
                assert!((got - want).abs() < 1e-12, "step {s}: {got} vs {want}");
            } else {
                assert_eq!(
                    got,
                    3.0 - 0.5 * 2.0,
                    "step {s}: the step-2 residual, reused"
                );
            }
        }
    }

    #[test]
    fn order_two_on_a_quadratic_is_cache_dits_formula() {
        // r = a + b s + c s^2, computed at 0, 1, 2, 4, 6, 8 (spacing 2 from step 2 on). At step 7:
        // F1 = (r6 - r4) / 2 = b + 10c, F1_prev = (r4 - r2) / 2 = b + 6c, F2 = (F1 - F1_prev) / 2 = 2c,
        // e = 1: order 2 gives r6 + F1 + F2 / 2 = a + 7b + 47c, order 1 r6 + F1 = a + 7b + 46c; the
        // truth is a + 7b + 49c.
        let (a, b, c) = (1.0, 0.25, -0.125);
        let compute = [true, true, true, false, true, false, true, false, true];
        let r = |s: f64| a + b * s + c * s * s;
        let at7 = |order| {
            forecasts(&compute, order, r)
                .into_iter()
                .find(|(s, _, _)| *s == 7)
                .unwrap()
                .1
        };
        assert!(
            (at7(2) - (a + 7.0 * b + 47.0 * c)).abs() < 1e-12,
            "{}",
            at7(2)
        );
        assert!(
            (at7(1) - (a + 7.0 * b + 46.0 * c)).abs() < 1e-12,
            "{}",
            at7(1)
        );
        assert!((at7(2) - r(7.0)).abs() < (at7(1) - r(7.0)).abs());
    }

    #[test]
    fn before_two_updates_it_is_plain_reuse() {
        let coef = coefficients(&[true, false, false], Taylor { order: 1 });
        assert_eq!(coef[1], vec![1.0, 0.0]);
        assert_eq!(coef[2], vec![1.0, 0.0]);
    }

    #[test]
    fn options_are_checked() {
        let take = |s: &str| Taylor::take_from(&mut toml::from_str(s).unwrap());
        assert_eq!(take("").unwrap(), None);
        assert_eq!(
            take("forecast = \"taylor\"").unwrap(),
            Some(Taylor { order: 1 })
        );
        assert_eq!(
            take("forecast = \"taylor\"\norder = 2").unwrap(),
            Some(Taylor { order: 2 })
        );
        assert!(take("forecast = \"taylor\"\norder = 3").is_err());
        assert!(take("order = 2").is_err());
        assert!(take("forecast = \"linear\"").is_err());
    }

    fn test_state_in(v: &str) -> String {
        format!("ditc.state.t.{v}")
    }

    fn test_state_out(v: &str) -> String {
        format!("ditc.state_out.t.{v}")
    }

    /// The in-graph weights ([`emit_weights`], what every policy deciding in the graph bakes) run
    /// step by step by the CPU runtime over `compute`, the states carried by hand; at every skipped
    /// step `(step, weights, forecast of r from the computed steps' values, r(step))`.
    fn in_graph_forecasts(
        compute: &[bool],
        order: usize,
        r: impl Fn(f64) -> f64,
    ) -> Vec<(usize, Vec<f32>, f64, f64)> {
        use crate::ir::{Graph, Model, Tensor, ValueInfo};
        let calls = COMPUTED_CALLS;
        let mut e = Emitter::new("t", 17);
        forecast_weights_and_count(&mut e, order, calls);
        let mut scalars = vec![(calls, DataType::I64)];
        scalars.extend(UPDATE_STEPS[..=order].iter().map(|v| (*v, DataType::I64)));
        let mut graph = Graph {
            name: "weights".into(),
            nodes: e.nodes,
            initializers: e.constants,
            ..Graph::default()
        };
        graph
            .inputs
            .push(ValueInfo::tensor(STEP_INPUT, DataType::I64, vec![]));
        graph
            .inputs
            .push(ValueInfo::tensor(DECISION, DataType::Bool, vec![]));
        graph.outputs.push(ValueInfo::tensor(
            FORECAST_WEIGHTS,
            DataType::F32,
            vec![crate::ir::Dim::Value(order as i64 + 1)],
        ));
        for (v, dtype) in &scalars {
            graph
                .inputs
                .push(ValueInfo::tensor(&test_state_in(v), *dtype, vec![]));
            graph
                .outputs
                .push(ValueInfo::tensor(&test_state_out(v), *dtype, vec![]));
        }
        crate::ir::sort_topologically(&mut graph).unwrap();
        let model = Model::new(graph, 17);
        let mut state: Vec<i64> = vec![0; scalars.len()];
        let mut history: Vec<f64> = Vec::new(); // newest first
        let mut out = Vec::new();
        for (s, &computes) in compute.iter().enumerate() {
            let mut feed = vec![
                Tensor::from_i64(STEP_INPUT, vec![], &[s as i64]),
                Tensor::from_raw(
                    DECISION,
                    DataType::Bool,
                    vec![],
                    vec![computes as u8].into(),
                )
                .unwrap(),
            ];
            for ((v, _), value) in scalars.iter().zip(&state) {
                feed.push(Tensor::from_i64(&test_state_in(v), vec![], &[*value]));
            }
            let outputs = crate::runtime::run_once(&model, &feed).unwrap();
            let get = |name: &str| outputs.iter().find(|t| t.name == name).unwrap();
            for ((v, _), value) in scalars.iter().zip(state.iter_mut()) {
                *value = get(&test_state_out(v)).to_i64_vec().unwrap()[0];
            }
            if computes {
                history.insert(0, r(s as f64));
                history.truncate(order + 1);
            } else {
                let w = get(FORECAST_WEIGHTS).to_f32_vec().unwrap();
                let got = w.iter().zip(&history).map(|(w, x)| *w as f64 * x).sum();
                out.push((s, w, got, r(s as f64)));
            }
        }
        out
    }

    /// Count and weights as the policies without a count of their own emit them.
    fn forecast_weights_and_count(e: &mut Emitter, order: usize, calls: &str) {
        let (calls_in, calls_out) = (test_state_in(calls), test_state_out(calls));
        emit_weights(e, order, &calls_in, test_state_in, test_state_out);
        emit_call_count(e, &calls_in, &calls_out);
    }

    #[test]
    fn in_graph_weights_forecast_a_linear_residual_exactly() {
        // As `order_one_forecasts_a_linear_residual_exactly`: computed at 0, 1, 2, 4, 6, 9.
        let compute = [
            true, true, true, false, true, false, true, false, false, true, false,
        ];
        for order in [1, 2] {
            let table = coefficients(&compute, Taylor { order });
            for (s, w, got, want) in in_graph_forecasts(&compute, order, |s| 3.0 - 0.5 * s) {
                // The graph's weights are the static-table function's (f32).
                for (a, b) in w.iter().zip(&table[s]) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-6,
                        "order {order}, step {s}: {w:?} vs {:?}",
                        table[s]
                    );
                }
                if s > 4 {
                    assert!(
                        (got - want).abs() < 1e-5,
                        "order {order}, step {s}: {got} vs {want}"
                    );
                } else {
                    assert_eq!(
                        got, 2.0,
                        "order {order}, step {s}: the step-2 value, reused"
                    );
                }
            }
        }
    }

    #[test]
    fn in_graph_weights_on_a_quadratic_are_cache_dits_formula() {
        // As `order_two_on_a_quadratic_is_cache_dits_formula`: at step 7 order 2 gives a + 7b + 47c.
        let (a, b, c) = (1.0, 0.25, -0.125);
        let compute = [true, true, true, false, true, false, true, false, true];
        let r = |s: f64| a + b * s + c * s * s;
        let at7 = |order| {
            in_graph_forecasts(&compute, order, r)
                .into_iter()
                .find(|(s, ..)| *s == 7)
                .unwrap()
                .2
        };
        assert!(
            (at7(2) - (a + 7.0 * b + 47.0 * c)).abs() < 1e-5,
            "{}",
            at7(2)
        );
        assert!(
            (at7(1) - (a + 7.0 * b + 46.0 * c)).abs() < 1e-5,
            "{}",
            at7(1)
        );
    }
}
