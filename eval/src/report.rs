//! The evaluation's outputs: the printed table, `results.csv`, `results.json`, and the findings
//! in sentences.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{
    ConfigResult, Configuration, EvalError, EvalReport, EvalSettings, EvalVerifier, discordant,
    sign_test,
};

/// How many of `result`'s requests stopped for each reason, e.g. `agreement 45, max_samples 98`
/// (the confident stop fires only where samples would retrace a confident greedy answer).
fn stop_tally(result: &ConfigResult) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for reason in result.items.iter().filter_map(|i| i.stop_reason) {
        match counts
            .iter_mut()
            .find(|(label, _)| *label == reason.label())
        {
            Some((_, n)) => *n += 1,
            None => counts.push((reason.label(), 1)),
        }
    }
    counts.sort();
    if counts.is_empty() {
        return "not recorded".into();
    }
    counts
        .iter()
        .map(|(label, n)| format!("{label} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Significance level of the paired sign test behind "gained" or "lost".
const ALPHA: f64 = 0.05;

/// The results as a Markdown table.
pub fn table(report: &EvalReport) -> String {
    let mut out = String::new();
    out.push_str("| family | configuration | accuracy [95% CI] | pass@k | samples/req | joules/req (source) | tokens/req | latency s |\n");
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in &report.results {
        let pass = r.pass_at_k.map_or_else(
            || "-".to_owned(),
            |p| format!("{:.0}% (k={})", p.value * 100.0, p.k),
        );
        let _ = writeln!(
            out,
            "| {} | {} | {:.0}% [{:.0}-{:.0}] | {} | {:.2} | {:.3} ({}) | {:.1} | {:.2} |",
            r.family.name(),
            r.label,
            r.accuracy.estimate * 100.0,
            r.accuracy.low * 100.0,
            r.accuracy.high * 100.0,
            pass,
            r.mean_samples,
            r.mean_joules,
            r.energy_source,
            r.mean_completion_tokens,
            r.mean_latency_s,
        );
    }
    out
}

const CSV_HEADER: &str = "family,configuration,kind,samples_max,items,correct,accuracy,accuracy_low95,accuracy_high95,pass_at_k,pass_k,mean_samples,mean_joules,energy_source,mean_completion_tokens,mean_prompt_tokens,mean_latency_s,allocation_joules,on_frontier";

/// The results as CSV, one row per family and configuration.
pub fn csv(report: &EvalReport) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for r in &report.results {
        let (kind, depth, allocation) = match r.configuration {
            Configuration::Greedy => ("greedy", 1, None),
            Configuration::OtherModel => ("model_size", 1, None),
            Configuration::Vote { k } => ("vote", k, None),
            Configuration::PolicyVote { k } => ("policy_vote", k, None),
            Configuration::EarlyStop { max_samples, .. } => ("early_stop", max_samples, None),
            Configuration::Adaptive {
                allocation_joules,
                verifier,
                feedback,
                ..
            } => (
                match (verifier, feedback) {
                    (None, false) => "adaptive",
                    (None, true) => "adaptive_feedback",
                    (Some(EvalVerifier::Schema), _) => "adaptive_schema",
                    (Some(EvalVerifier::Tool), _) => "adaptive_tool",
                },
                report.settings.max_samples,
                Some(allocation_joules),
            ),
            Configuration::BestOfN {
                max_samples,
                verifier: EvalVerifier::Schema,
            } => ("best_of_n_schema", max_samples, None),
            Configuration::BestOfN {
                max_samples,
                verifier: EvalVerifier::Tool,
            } => ("best_of_n_tool", max_samples, None),
        };
        let family: Vec<&ConfigResult> = report
            .results
            .iter()
            .filter(|x| x.family == r.family)
            .collect();
        let on_frontier = frontier(&family).iter().any(|f| f.label == r.label);
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{:.4},{:.4},{:.4},{},{},{:.3},{:.5},{},{:.2},{:.2},{:.4},{},{}",
            r.family.name(),
            csv_field(&r.label),
            kind,
            depth,
            r.items.len(),
            r.items.iter().filter(|i| i.correct).count(),
            r.accuracy.estimate,
            r.accuracy.low,
            r.accuracy.high,
            r.pass_at_k
                .map_or(String::new(), |p| format!("{:.4}", p.value)),
            r.pass_at_k.map_or(String::new(), |p| p.k.to_string()),
            r.mean_samples,
            r.mean_joules,
            r.energy_source,
            r.mean_completion_tokens,
            r.mean_prompt_tokens,
            r.mean_latency_s,
            allocation.map_or(String::new(), |a| format!("{a:.5}")),
            on_frontier,
        );
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Writes `results.csv`, `results.json` and one frontier PNG per family into `dir`; returns the
/// paths written.
pub fn write_all(report: &EvalReport, dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| EvalError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut written = Vec::new();
    let csv_path = dir.join("results.csv");
    std::fs::write(&csv_path, csv(report)).map_err(io(&csv_path))?;
    written.push(csv_path);
    let json_path = dir.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(report)?).map_err(io(&json_path))?;
    written.push(json_path);
    for &family in &report.settings.families {
        let rows: Vec<&ConfigResult> = report
            .results
            .iter()
            .filter(|r| r.family == family)
            .collect();
        let path = dir.join(format!("frontier_{}.png", family.name()));
        super::plot::frontier_png(&path, family, &rows, &frontier(&rows), &report.model)?;
        written.push(path);
    }
    Ok(written)
}

/// The configurations no other one beats on both accuracy and joules (the Pareto frontier),
/// cheapest first.
pub fn frontier<'a>(rows: &[&'a ConfigResult]) -> Vec<&'a ConfigResult> {
    let mut points: Vec<&ConfigResult> = rows
        .iter()
        .copied()
        .filter(|r| {
            !rows.iter().any(|o| {
                o.label != r.label
                    && o.accuracy.estimate >= r.accuracy.estimate
                    && o.mean_joules <= r.mean_joules
                    && (o.accuracy.estimate > r.accuracy.estimate || o.mean_joules < r.mean_joules)
            })
        })
        .collect();
    points.sort_by(|a, b| a.mean_joules.total_cmp(&b.mean_joules));
    points
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// What the results show, family by family, in sentences: gains and losses against greedy with
/// a paired sign test, the cost of each, early-stop against the deepest vote, adaptive against
/// uniform depth at equal energy, best-of-N against greedy, and the frontier.
pub fn findings(results: &[ConfigResult], settings: &EvalSettings) -> Vec<String> {
    let mut out = Vec::new();
    for &family in &settings.families {
        let rows: Vec<&ConfigResult> = results.iter().filter(|r| r.family == family).collect();
        let Some(greedy) = rows
            .iter()
            .copied()
            .find(|r| r.configuration == Configuration::Greedy)
        else {
            continue;
        };
        let deepest = rows
            .iter()
            .copied()
            .filter_map(|r| match r.configuration {
                Configuration::Vote { k } => Some((k, r)),
                _ => None,
            })
            .max_by_key(|(k, _)| *k);
        let mut f = FamilyFindings {
            name: family.name(),
            rows,
            greedy,
            deepest,
            out: Vec::new(),
        };
        f.against_greedy();
        f.greedy_row_in_a_vote();
        f.early_stop();
        f.adaptive();
        f.best_of_n();
        f.cheapest_tied();
        f.frontier();
        out.extend(f.out);
    }
    out
}

/// The findings of one family, section by section.
struct FamilyFindings<'a> {
    name: &'static str,
    rows: Vec<&'a ConfigResult>,
    greedy: &'a ConfigResult,
    /// The deepest fixed vote and its depth.
    deepest: Option<(usize, &'a ConfigResult)>,
    out: Vec<String>,
}

impl<'a> FamilyFindings<'a> {
    fn find(&self, c: &dyn Fn(&Configuration) -> bool) -> Option<&'a ConfigResult> {
        self.rows.iter().copied().find(|r| c(&r.configuration))
    }

    /// Greedy's accuracy and cost, and every configuration against it (paired sign test).
    fn against_greedy(&mut self) {
        let (name, greedy) = (self.name, self.greedy);
        let source = greedy.energy_source;
        self.out.push(format!(
            "{name}: greedy {} at {:.3} J/request ({source}).",
            pct(greedy.accuracy.estimate),
            greedy.mean_joules
        ));
        for r in self
            .rows
            .iter()
            .filter(|r| r.configuration != Configuration::Greedy)
        {
            let (wins, losses) = discordant(r, greedy);
            let p = sign_test(wins, losses);
            let delta = (r.accuracy.estimate - greedy.accuracy.estimate) * 100.0;
            let ratio = if greedy.mean_joules > 0.0 {
                r.mean_joules / greedy.mean_joules
            } else {
                f64::NAN
            };
            let extra = r.mean_joules - greedy.mean_joules;
            let verdict = if p < ALPHA && delta > 0.0 && extra <= 0.0 {
                format!(
                    "more accurate for less energy: {:.3} J/request less",
                    -extra
                )
            } else if p < ALPHA && delta > 0.0 {
                format!(
                    "TTC bought accuracy: {:.1} pts per extra joule",
                    delta / extra
                )
            } else if p < ALPHA && delta < 0.0 {
                "significantly worse than greedy".to_owned()
            } else if extra > 0.0 {
                format!("no significant gain: {extra:.3} J/request more for nothing measurable")
            } else {
                format!("no significant difference, {:.3} J/request less", -extra)
            };
            self.out.push(format!(
            "{name}: {} {} vs greedy {} ({delta:+.0} pts; {wins} items gained, {losses} lost, sign test p={p:.2}) at {ratio:.1}x greedy's joules -> {verdict}.",
            r.label,
            pct(r.accuracy.estimate),
            pct(greedy.accuracy.estimate),
        ));
        }
    }

    /// The sidecar's vote (greedy row first) against the plain vote at the same depth.
    fn greedy_row_in_a_vote(&mut self) {
        let name = self.name;
        let deepest = self.deepest;
        let policy_vote = self.find(&|c| matches!(c, Configuration::PolicyVote { .. }));
        if let (Some(policy), Some((k, vote))) = (policy_vote, deepest) {
            let (wins, losses) = discordant(policy, vote);
            self.out.push(format!(
            "{name}: the greedy row in a vote: {} (the greedy answer and {} samples, as the sidecar draws them) {} vs vote@{k} ({k} samples) {} ({:+.0} pts; {wins} items gained, {losses} lost, p={:.2}) at {:.0}% of its joules.",
            policy.label,
            k - 1,
            pct(policy.accuracy.estimate),
            pct(vote.accuracy.estimate),
            (policy.accuracy.estimate - vote.accuracy.estimate) * 100.0,
            sign_test(wins, losses),
            policy.mean_joules / vote.mean_joules.max(1e-12) * 100.0,
        ));
        }
    }

    /// Early stopping against the fixed votes, with its goal.
    fn early_stop(&mut self) {
        let (name, greedy, deepest) = (self.name, self.greedy, self.deepest);
        let policy_vote = self.find(&|c| matches!(c, Configuration::PolicyVote { .. }));
        if let (Some(early), Some((k, vote))) = (
            self.find(&|c| matches!(c, Configuration::EarlyStop { .. })),
            deepest,
        ) {
            // The early-stopping goal: within 1 pt of the fixed vote's accuracy at <= 40% of its
            // joules.
            let against = |fixed: &ConfigResult| {
                let delta = (early.accuracy.estimate - fixed.accuracy.estimate) * 100.0;
                let share = early.mean_joules / fixed.mean_joules.max(1e-12);
                let met = delta >= -1.0 && share <= 0.40;
                format!(
                    "{} {} ({delta:+.0} pts) at {:.0}% of its joules: goal {}",
                    fixed.label,
                    pct(fixed.accuracy.estimate),
                    share * 100.0,
                    if met { "met" } else { "not met" }
                )
            };
            let mut fixed = vec![against(vote)];
            fixed.extend(policy_vote.map(against));
            // No stopping rule draws less than one sample, and greedy is one sample.
            let floor = greedy.mean_joules / vote.mean_joules.max(1e-12);
            self.out.push(format!(
            "{name}: early-stop {} with {:.1} samples vs {}; the goal is within 1 pt at <= 40%. One sample alone (greedy) costs {:.0}% of vote@{k} on this engine, the floor of any stopping rule. Stops: {}.",
            pct(early.accuracy.estimate),
            early.mean_samples,
            fixed.join("; vs "),
            floor * 100.0,
            stop_tally(early),
        ));
        }
    }

    /// The controller under its allocation, against uniform depth at equal energy, with and
    /// without feedback and the checking tool.
    fn adaptive(&mut self) {
        let name = self.name;
        for adaptive in self
            .rows
            .iter()
            .copied()
            .filter(|r| matches!(r.configuration, Configuration::Adaptive { .. }))
        {
            let Configuration::Adaptive {
                allocation_joules,
                reference_depth,
                verifier,
                feedback,
            } = adaptive.configuration
            else {
                continue;
            };
            let Some(uniform) = self.find(&|c| *c == Configuration::Vote { k: reference_depth })
            else {
                continue;
            };
            let (wins, losses) = discordant(adaptive, uniform);
            self.out.push(format!(
            "{name}: {} under {allocation_joules:.3} J/request (vote@{reference_depth}'s mean) spent {:.3} J ({:+.0}% of the allocation) with {:.1} samples and reached {} vs uniform vote@{reference_depth} {} ({wins} items gained, {losses} lost, p={:.2}).",
            adaptive.label,
            adaptive.mean_joules,
            (adaptive.mean_joules / allocation_joules.max(1e-12) - 1.0) * 100.0,
            adaptive.mean_samples,
            pct(adaptive.accuracy.estimate),
            pct(uniform.accuracy.estimate),
            sign_test(wins, losses),
        ));
            // With feedback, the peer is the same controller without it: where depth changes
            // answers without making them right, feedback should take the depth away.
            if feedback
                && let Some(blind) = self.find(&|c| {
                    matches!(
                        c,
                        Configuration::Adaptive {
                            verifier: None,
                            feedback: false,
                            ..
                        }
                    )
                })
            {
                let (wins, losses) = discordant(adaptive, blind);
                let late = |r: &ConfigResult| {
                    let tail = &r.items[r.items.len() / 2..];
                    tail.iter().map(|i| i.samples as f64).sum::<f64>() / tail.len().max(1) as f64
                };
                self.out.push(format!(
                "{name}: told which answers were right, {} drew {:.1} samples per request over the second half of the items vs {:.1} without feedback, at {:.3} vs {:.3} J/request, and reached {} vs {} ({wins} items gained, {losses} lost, p={:.2}).",
                adaptive.label,
                late(adaptive),
                late(blind),
                adaptive.mean_joules,
                blind.mean_joules,
                pct(adaptive.accuracy.estimate),
                pct(blind.accuracy.estimate),
                sign_test(wins, losses),
            ));
            }
            // With the tool, the uniform peer is best-of-k from one batch of k samples: at
            // vote@k's joules it is right whenever one of the k is (the tool accepts exactly the
            // right answers), which is pass@k.
            if verifier == Some(EvalVerifier::Tool)
                && let Some(pass) = uniform.pass_at_k
            {
                let delta = (adaptive.accuracy.estimate - pass.value) * 100.0;
                // pass@k is an expectation over the items, so adaptive's interval decides.
                let verdict = if pass.value < adaptive.accuracy.low {
                    "adaptive depth beats uniform depth (outside adaptive's 95% interval)"
                } else if pass.value > adaptive.accuracy.high {
                    "adaptive depth trails uniform depth (outside adaptive's 95% interval)"
                } else if delta > 0.0 {
                    "ahead, but within adaptive's 95% interval"
                } else {
                    "not ahead: within adaptive's 95% interval"
                };
                self.out.push(format!(
                "{name}: at equal energy, {} {} vs uniform best-of-{reference_depth} with the same tool {} (pass@{reference_depth} from vote@{}'s samples): {delta:+.0} pts, {verdict}.",
                adaptive.label,
                pct(adaptive.accuracy.estimate),
                pct(pass.value),
                pass.from_samples,
            ));
            }
        }
    }

    /// Best-of-N against greedy and the deepest vote.
    fn best_of_n(&mut self) {
        let (name, greedy, deepest) = (self.name, self.greedy, self.deepest);
        for best in self
            .rows
            .iter()
            .copied()
            .filter(|r| matches!(r.configuration, Configuration::BestOfN { .. }))
        {
            let ratio = best.mean_joules / greedy.mean_joules.max(1e-12);
            let (wins, losses) = discordant(best, greedy);
            self.out.push(format!(
            "{name}: {} {} vs greedy {} at {ratio:.1}x greedy's joules ({:.1} samples, {:.0}% of requests verified; {wins} items gained, {losses} lost, p={:.3}).",
            best.label,
            pct(best.accuracy.estimate),
            pct(greedy.accuracy.estimate),
            best.mean_samples,
            100.0 * best.items.iter().filter(|i| i.verified == Some(true)).count() as f64
                / best.items.len().max(1) as f64,
            sign_test(wins, losses),
        ));
            if let Some((k, vote)) = deepest {
                self.out.push(format!(
                    "{name}: {} {} at {:.3} J vs vote@{k} {} at {:.3} J.",
                    best.label,
                    pct(best.accuracy.estimate),
                    best.mean_joules,
                    pct(vote.accuracy.estimate),
                    vote.mean_joules
                ));
            }
        }
    }

    /// At equal accuracy: the cheapest configuration statistically tied with the best one.
    fn cheapest_tied(&mut self) {
        let (name, greedy) = (self.name, self.greedy);
        // At equal accuracy: the cheapest configuration statistically tied with the best one.
        if let Some(top) = self.rows.iter().copied().max_by(|a, b| {
            a.accuracy
                .estimate
                .total_cmp(&b.accuracy.estimate)
                .then(b.mean_joules.total_cmp(&a.mean_joules))
        }) {
            let cheapest_tied = self
                .rows
                .iter()
                .copied()
                .filter(|r| {
                    let (w, l) = discordant(top, r);
                    sign_test(w, l) >= ALPHA
                })
                .min_by(|a, b| a.mean_joules.total_cmp(&b.mean_joules));
            if let Some(c) = cheapest_tied {
                self.out.push(format!(
                "{name}: best accuracy {} by {} at {:.3} J; the cheapest configuration not significantly worse is {} ({}) at {:.3} J = {:.0}% of that and {:.1}x greedy.",
                pct(top.accuracy.estimate),
                top.label,
                top.mean_joules,
                c.label,
                pct(c.accuracy.estimate),
                c.mean_joules,
                100.0 * c.mean_joules / top.mean_joules.max(1e-12),
                c.mean_joules / greedy.mean_joules.max(1e-12),
            ));
            }
        }
    }

    /// The accuracy-vs-joules frontier.
    fn frontier(&mut self) {
        let name = self.name;
        let front: Vec<String> = frontier(&self.rows)
            .iter()
            .map(|r| r.label.clone())
            .collect();
        self.out.push(format!(
            "{name}: accuracy-vs-joules frontier: {}.",
            front.join(" -> ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ItemRecord;
    use crate::stats::wilson_95;
    use crate::tasks::TaskFamily;
    use ttc_energy::EnergySource;

    /// A configuration's result on items that are right where `correct` says, at `joules` each.
    fn result(configuration: Configuration, correct: &[bool], joules: f64) -> ConfigResult {
        let items: Vec<ItemRecord> = correct
            .iter()
            .enumerate()
            .map(|(i, &correct)| ItemRecord {
                item_id: format!("item-{i}"),
                expected: "1".into(),
                answer: Some(if correct { "1" } else { "2" }.into()),
                correct,
                samples: 1,
                correct_samples: usize::from(correct),
                verified: None,
                joules,
                energy_source: EnergySource::Estimate,
                prompt_tokens: 10,
                completion_tokens: 10,
                latency_s: 0.1,
                stop_reason: None,
            })
            .collect();
        let right = correct.iter().filter(|&&c| c).count() as u64;
        ConfigResult {
            family: TaskFamily::StructuredOutput,
            model: None,
            label: configuration.label(),
            configuration,
            accuracy: wilson_95(right, correct.len() as u64),
            pass_at_k: None,
            mean_joules: joules,
            energy_source: EnergySource::Estimate,
            mean_samples: 1.0,
            mean_completion_tokens: 10.0,
            mean_prompt_tokens: 10.0,
            mean_latency_s: 0.1,
            items,
        }
    }

    /// The finding that contains every one of `needles`.
    fn finding<'a>(findings: &'a [String], needles: &[&str]) -> &'a str {
        findings
            .iter()
            .find(|f| needles.iter().all(|n| f.contains(n)))
            .unwrap_or_else(|| panic!("no finding with {needles:?} in {findings:?}"))
    }

    #[test]
    fn a_configuration_more_accurate_for_less_energy_is_said_to_be_so() {
        let greedy: Vec<bool> = (0..40).map(|i| i < 10).collect();
        let sampled: Vec<bool> = (0..40).map(|i| i < 30).collect();
        let results = [
            result(Configuration::Greedy, &greedy, 5.0),
            result(Configuration::Vote { k: 1 }, &sampled, 4.5),
            result(Configuration::Vote { k: 4 }, &sampled, 7.0),
        ];
        let findings = findings(&results, &EvalSettings::default());
        let cheaper = finding(&findings, &["vote@1 "]);
        assert!(
            cheaper.contains("more accurate for less energy: 0.500 J/request less"),
            "{cheaper}"
        );
        let dearer = finding(&findings, &["vote@4 ", "vs greedy"]);
        assert!(
            dearer.contains("TTC bought accuracy: 25.0 pts per extra joule"),
            "{dearer}"
        );
    }

    #[test]
    fn early_stop_is_held_against_both_fixed_votes_and_the_greedy_row_is_priced() {
        let right = |n: usize| -> Vec<bool> { (0..40).map(|i| i < n).collect() };
        let results = [
            result(Configuration::Greedy, &right(10), 2.0),
            result(Configuration::Vote { k: 8 }, &right(30), 10.0),
            result(Configuration::PolicyVote { k: 8 }, &right(20), 10.0),
            result(
                Configuration::EarlyStop {
                    max_samples: 8,
                    agreement: 0.75,
                },
                &right(20),
                3.0,
            ),
        ];
        let findings = findings(&results, &EvalSettings::default());
        let row = finding(&findings, &["the greedy row in a vote"]);
        assert!(
            row.contains("policy-vote@8 (the greedy answer and 7 samples")
                && row.contains("50% vs vote@8 (8 samples) 75% (-25 pts; 0 items gained, 10 lost"),
            "{row}"
        );
        let early = finding(&findings, &["early-stop 50%"]);
        assert!(
            early.contains("vs vote@8 75% (-25 pts) at 30% of its joules: goal not met")
                && early.contains("vs policy-vote@8 50% (+0 pts) at 30% of its joules: goal met"),
            "{early}"
        );
    }
}
