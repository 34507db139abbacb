//! The whole inner loop on scripted workloads: a scripted "model" whose samples are right with a
//! per-query-kind probability, a scripted meter, and the real controller, session and learner.

use super::{AnswerType, BudgetState, PromptFeatures, VoteWeighting, majority_vote};
use crate::feedback::Feedback;
use crate::rng::SplitMix64;
use crate::stopping::WindowDecision;
use crate::vote::Candidate;
use crate::{MeasuredEnergy, RequestFeatures, TtcController, TtcOptions, TtcPolicy};

/// How a scripted query behaves under sampling.
#[derive(Debug, Clone, Copy, PartialEq)]
enum QueryKind {
    /// Right almost always: depth buys nothing.
    Easy,
    /// Right 45% of the time, wrong answers spread over four distractors: a vote of more
    /// samples is right more often, so depth pays.
    Noisy,
    /// The same wrong answer almost always (the systematic error measured on SmolLM2): depth
    /// buys nothing.
    Systematic,
    /// Right or wrong with even odds, two answers (yes/no facts the model does not know):
    /// samples disagree half the time, yet a vote is right no more often than one sample, so
    /// depth buys nothing, and only correctness feedback can tell.
    CoinFlip,
}

impl QueryKind {
    /// Prompts differ by kind the way real ones do: noisy ones are multi-digit arithmetic.
    fn prompt(self) -> &'static str {
        match self {
            Self::Easy => "Is the sky blue? Answer yes or no.",
            Self::Noisy => "What is 4821 * 37 + 1290 - 77? Answer with the number only.",
            Self::Systematic => "Is London in Spain? Answer yes or no.",
            Self::CoinFlip => "Is Lyon further north than Geneva? Answer yes or no.",
        }
    }

    /// How likely a sample is to give `answer`.
    fn probability(self, answer: &str) -> f64 {
        let right = match self {
            Self::Easy => 0.99,
            Self::Noisy => 0.45,
            Self::Systematic => 0.01,
            Self::CoinFlip => 0.5,
        };
        match (self, answer) {
            (_, "right") => right,
            (Self::Noisy, _) => (1.0 - right) / 4.0,
            _ => 1.0 - right,
        }
    }

    fn sample(self, rng: &mut SplitMix64) -> &'static str {
        let u = rng.unit();
        match self {
            Self::Easy if u < 0.99 => "right",
            Self::Easy => "wrong-1",
            Self::Noisy if u < 0.45 => "right",
            Self::Noisy => ["wrong-1", "wrong-2", "wrong-3", "wrong-4"][rng.below(4) as usize],
            Self::Systematic if u < 0.99 => "wrong-1",
            Self::Systematic => "right",
            Self::CoinFlip if u < 0.5 => "right",
            Self::CoinFlip => "wrong-1",
        }
    }
}

const PROMPT_TOKENS: usize = 40;

/// Scripted meter: 1 J fixed, 0.02 J per prompt token, 0.04 J per generated token, +-10% noise.
fn joules(completion_tokens: usize, rng: &mut SplitMix64) -> f64 {
    (1.0 + 0.02 * PROMPT_TOKENS as f64 + 0.04 * completion_tokens as f64) * (0.9 + 0.2 * rng.unit())
}

fn sample_tokens(rng: &mut SplitMix64) -> usize {
    20 + rng.below(21) as usize
}

fn features(kind: QueryKind) -> RequestFeatures {
    RequestFeatures {
        prompt: PromptFeatures::from_text(kind.prompt(), PROMPT_TOKENS),
        answer_type: AnswerType::Short,
        max_tokens: 64,
        reasoning_model: false,
        row_limit: None,
        effort: None,
        reasoning_budget: None,
    }
}

#[derive(Debug, Default)]
struct RunStats {
    requests: usize,
    correct: usize,
    joules: Vec<f64>,
    samples: Vec<usize>,
    states: Vec<BudgetState>,
}

impl RunStats {
    fn accuracy(&self) -> f64 {
        self.correct as f64 / self.requests.max(1) as f64
    }
    fn mean_joules(&self, last: usize) -> f64 {
        let tail = &self.joules[self.joules.len().saturating_sub(last)..];
        tail.iter().sum::<f64>() / tail.len().max(1) as f64
    }
    fn mean_samples(&self, last: usize) -> f64 {
        let tail = &self.samples[self.samples.len().saturating_sub(last)..];
        tail.iter().sum::<usize>() as f64 / tail.len().max(1) as f64
    }
}

/// Runs `kinds` through the controller, window by window, as the HTTP layer will.
fn run_controller(controller: &mut TtcController, kinds: &[QueryKind], seed: u64) -> RunStats {
    run_with_feedback(controller, kinds, seed, false)
}

/// [`run_controller`], and where `feedback`, each answer's expected one is posted back.
fn run_with_feedback(
    controller: &mut TtcController,
    kinds: &[QueryKind],
    seed: u64,
    feedback: bool,
) -> RunStats {
    run_script(
        controller,
        kinds,
        seed,
        Script {
            feedback,
            priced: false,
        },
    )
}

/// How the scripted model's samples reach the controller.
#[derive(Debug, Clone, Copy)]
struct Script {
    /// Post each answer's expected one back as correctness feedback.
    feedback: bool,
    /// Price samples as the engine does: each answer is one path of fixed length, and a
    /// sample's retrace log-probability is its answer's (so the confident stop can act).
    /// Unpriced, lengths are random and no sample says how likely it is.
    priced: bool,
}

fn run_script(
    controller: &mut TtcController,
    kinds: &[QueryKind],
    seed: u64,
    Script { feedback, priced }: Script,
) -> RunStats {
    let mut rng = SplitMix64::new(seed);
    let mut stats = RunStats::default();
    for (i, kind) in kinds.iter().enumerate() {
        let mut session = controller.plan(&features(*kind));
        let mut n = session.first_window();
        let mut tokens = 0;
        loop {
            for _ in 0..n {
                let mut t = sample_tokens(&mut rng);
                let answer = kind.sample(&mut rng);
                let retrace = priced.then(|| {
                    t = 25 + answer.len();
                    kind.probability(answer).ln()
                });
                tokens += t;
                session.add_sample(answer, -0.5 * t as f64, t, retrace);
            }
            match session.decide() {
                WindowDecision::Continue { samples } => n = samples,
                WindowDecision::Stop { .. } => break,
            }
        }
        let measured = MeasuredEnergy {
            joules: joules(tokens, &mut rng),
            prompt_tokens: PROMPT_TOKENS,
            completion_tokens: tokens,
        };
        let outcome = session.finish(measured);
        stats.requests += 1;
        stats.correct += usize::from(outcome.answer.as_deref() == Some("right"));
        stats.joules.push(outcome.joules);
        stats.samples.push(outcome.samples);
        stats.states.push(outcome.budget_state);
        controller.record(&outcome);
        if feedback {
            controller
                .feedback(
                    &outcome.ticket(&format!("request-{i}")),
                    &Feedback::Expected("right".into()),
                )
                .expect("the expected answer is a short answer");
        }
    }
    stats
}

/// Uniform depth: every query gets `depth` samples and a plain majority vote.
fn run_uniform(kinds: &[QueryKind], depth: usize, seed: u64) -> RunStats {
    let mut rng = SplitMix64::new(seed);
    let mut stats = RunStats::default();
    for kind in kinds {
        let mut tokens = 0;
        let candidates: Vec<Candidate> = (0..depth)
            .map(|_| {
                let t = sample_tokens(&mut rng);
                tokens += t;
                Candidate {
                    answer: Some(kind.sample(&mut rng).to_string()),
                    logprob: -0.5 * t as f64,
                    tokens: t,
                    retrace_logprob: None,
                }
            })
            .collect();
        let vote = majority_vote(&candidates, VoteWeighting::Uniform);
        stats.requests += 1;
        stats.correct += usize::from(vote.is_some_and(|v| v.answer == "right"));
        stats.joules.push(joules(tokens, &mut rng));
        stats.samples.push(depth);
    }
    stats
}

/// A workload of equal thirds, in a seeded order.
fn mixed_workload(count: usize, seed: u64) -> Vec<QueryKind> {
    let mut rng = SplitMix64::new(seed);
    let mut kinds: Vec<QueryKind> = (0..count)
        .map(|i| [QueryKind::Easy, QueryKind::Noisy, QueryKind::Systematic][i % 3])
        .collect();
    rng.shuffle(&mut kinds);
    kinds
}

fn policy(max_samples: u32) -> TtcPolicy {
    TtcPolicy {
        max_samples,
        ..TtcPolicy::default()
    }
}

#[test]
fn holds_the_allocation_within_five_percent_over_200_requests_with_early_stopping() {
    for (allocation, seed) in [(3.6, 1), (4.5, 2), (5.5, 3)] {
        let mut controller =
            TtcController::new(policy(16), TtcOptions::default()).expect("valid policy");
        controller.set_allocation(Some(allocation));
        let stats = run_controller(&mut controller, &mixed_workload(600, seed), seed);
        let mean = stats.mean_joules(200);
        let deviation = mean / allocation - 1.0;
        eprintln!(
            "allocation {allocation} J: last-200 mean {mean:.3} J ({:+.2}%), mean samples {:.2}, accuracy {:.3}",
            100.0 * deviation,
            stats.mean_samples(200),
            stats.accuracy()
        );
        assert!(
            deviation.abs() <= 0.05,
            "allocation {allocation}: deviation {deviation:+.4}"
        );
        let report = controller.report();
        assert_eq!(report.budget.within_tolerance, Some(true), "{report:?}");
        assert!(report.depth_value.depth_pays, "{:?}", report.depth_value);
        // Every 200-request window after the warm-up holds too, not just the last one.
        for start in (200..=400).step_by(50) {
            let window = &stats.joules[start..start + 200];
            let m = window.iter().sum::<f64>() / 200.0;
            let worthless = stats.states[start..start + 200]
                .iter()
                .filter(|s| **s == BudgetState::DepthWorthless)
                .count();
            assert!(
                (m / allocation - 1.0).abs() <= 0.05,
                "window at {start}: {m:.3}, depth judged worthless in {worthless} requests"
            );
        }
    }
}

#[test]
fn beats_uniform_depth_at_equal_energy() {
    let kinds = mixed_workload(1500, 21);
    let mut controller =
        TtcController::new(policy(16), TtcOptions::default()).expect("valid policy");
    controller.set_allocation(Some(5.0));
    let adaptive = run_controller(&mut controller, &kinds, 22);
    let adaptive_joules = adaptive.mean_joules(usize::MAX);
    // The cheapest uniform depth that spends at least as much energy.
    let (depth, uniform) = (1..=16)
        .map(|d| (d, run_uniform(&kinds, d, 23)))
        .find(|(_, s)| s.mean_joules(usize::MAX) >= adaptive_joules)
        .expect("some uniform depth spends as much");
    eprintln!(
        "adaptive: {:.3} J/request, accuracy {:.3}, mean samples {:.2}; uniform depth {depth}: {:.3} J/request, accuracy {:.3}",
        adaptive_joules,
        adaptive.accuracy(),
        adaptive.mean_samples(usize::MAX),
        uniform.mean_joules(usize::MAX),
        uniform.accuracy()
    );
    assert!(
        adaptive.accuracy() >= uniform.accuracy() + 0.03,
        "adaptive {:.3} vs uniform {:.3}",
        adaptive.accuracy(),
        uniform.accuracy()
    );
    // The extra depth went to the queries where it changes answers.
    let report = controller.report();
    let class_of = |kind: QueryKind| super::difficulty::DepthClass {
        answer_type: AnswerType::Short,
        bin: features(kind).prompt.bin(),
    };
    let classes = &report.depth_value.classes;
    let find = |kind| classes.iter().find(|c| c.class == class_of(kind));
    let (Some(noisy), Some(easy)) = (find(QueryKind::Noisy), find(QueryKind::Easy)) else {
        panic!("classes not learned: {classes:?}");
    };
    assert!(noisy.disagreement > easy.disagreement + 0.2, "{classes:?}");
    // Easy queries' later samples disagree about 2% of the time, under the 5% below which
    // depth is judged worthless; whether the confidence bound has crossed it yet depends on how
    // many probes the run happened to draw, so the rate is what is checked.
    assert!(noisy.depth_pays && easy.disagreement < 0.05, "{classes:?}");
    let mean_samples = |kind: QueryKind| {
        let picked: Vec<usize> = kinds
            .iter()
            .zip(&adaptive.samples)
            .skip(kinds.len() / 2)
            .filter(|(k, _)| **k == kind)
            .map(|(_, s)| *s)
            .collect();
        picked.iter().sum::<usize>() as f64 / picked.len().max(1) as f64
    };
    let (noisy_depth, easy_depth) = (
        mean_samples(QueryKind::Noisy),
        mean_samples(QueryKind::Easy),
    );
    assert!(
        noisy_depth > 2.0 * easy_depth,
        "second half: noisy queries drew {noisy_depth:.2} samples, easy ones {easy_depth:.2}"
    );
}

#[test]
fn converges_to_minimum_depth_when_depth_buys_nothing() {
    let mut rng = SplitMix64::new(31);
    let kinds: Vec<QueryKind> = (0..400)
        .map(|_| {
            if rng.below(2) == 0 {
                QueryKind::Easy
            } else {
                QueryKind::Systematic
            }
        })
        .collect();
    let mut controller =
        TtcController::new(policy(16), TtcOptions::default()).expect("valid policy");
    controller.set_allocation(Some(10.0));
    let stats = run_controller(&mut controller, &kinds, 32);
    let report = controller.report();
    eprintln!(
        "depth buys nothing: last-200 mean samples {:.2}, mean joules {:.3} of 10 J, {:?}",
        stats.mean_samples(200),
        stats.mean_joules(200),
        report.depth_value
    );
    assert!(!report.depth_value.depth_pays, "{:?}", report.depth_value);
    // Minimum depth (1) except for the occasional learning probe.
    assert!(
        stats.mean_samples(200) <= 1.15,
        "{}",
        stats.mean_samples(200)
    );
    let worthless = stats.states[200..]
        .iter()
        .filter(|s| **s == BudgetState::DepthWorthless)
        .count();
    assert!(worthless >= 180, "{worthless}");
    // It spends well under the allocation, on purpose, and says so.
    assert!(stats.mean_joules(200) < 0.5 * 10.0);
}

#[test]
fn feedback_takes_depth_away_where_it_changes_answers_without_making_them_right() {
    let kinds = vec![QueryKind::CoinFlip; 1000];
    let class = super::difficulty::DepthClass {
        answer_type: AnswerType::Short,
        bin: features(QueryKind::CoinFlip).prompt.bin(),
    };
    let run = |feedback: bool| {
        let mut controller =
            TtcController::new(policy(16), TtcOptions::default()).expect("valid policy");
        controller.set_allocation(Some(6.0));
        let stats = run_with_feedback(&mut controller, &kinds, 51, feedback);
        (stats, controller.report().depth_value)
    };
    // Blind to correctness, the learner sees samples disagree half the time and keeps paying.
    let (blind, blind_value) = run(false);
    assert!(blind_value.depth_pays, "{blind_value:?}");
    assert!(blind.mean_samples(200) > 3.0, "{}", blind.mean_samples(200));
    // Told the right answers, it sees the vote gain nothing and falls back to minimum depth.
    let (told, told_value) = run(true);
    let learned = told_value.classes.iter().find(|c| c.class == class);
    eprintln!(
        "coin flips: blind {:.2} samples, {:.3} J, accuracy {:.3}; with feedback {:.2} samples, {:.3} J, accuracy {:.3}; {learned:?}",
        blind.mean_samples(200),
        blind.mean_joules(200),
        blind.accuracy(),
        told.mean_samples(200),
        told.mean_joules(200),
        told.accuracy()
    );
    let Some(learned) = learned else {
        panic!("class not learned: {told_value:?}");
    };
    assert!(!learned.depth_pays, "{learned:?}");
    assert!(learned.gain.is_some_and(|g| g.abs() < 0.05), "{learned:?}");
    assert!(told_value.feedback > 50, "{told_value:?}");
    assert!(told.mean_samples(200) <= 1.3, "{}", told.mean_samples(200));
    assert!(told.mean_joules(200) < 0.7 * blind.mean_joules(200));
}

#[test]
fn feedback_keeps_depth_where_it_makes_answers_right() {
    let kinds = vec![QueryKind::Noisy; 400];
    let mut controller =
        TtcController::new(policy(16), TtcOptions::default()).expect("valid policy");
    controller.set_allocation(Some(6.0));
    let stats = run_with_feedback(&mut controller, &kinds, 61, true);
    let value = controller.report().depth_value;
    eprintln!(
        "noisy with feedback: {:.2} samples, accuracy {:.3}, {value:?}",
        stats.mean_samples(200),
        stats.accuracy()
    );
    assert!(value.depth_pays, "{value:?}");
    assert!(value.gain.is_some_and(|g| g > 0.1), "{value:?}");
    assert!(stats.mean_samples(200) > 3.0, "{}", stats.mean_samples(200));
    assert!(
        stats.states[200..]
            .iter()
            .all(|s| *s != BudgetState::DepthWorthless)
    );
}

#[test]
fn without_difficulty_awareness_the_budget_still_holds() {
    let mut controller = TtcController::new(
        TtcPolicy {
            difficulty_aware: false,
            ..policy(16)
        },
        TtcOptions::default(),
    )
    .expect("valid policy");
    controller.set_allocation(Some(6.0));
    let kinds = vec![QueryKind::Noisy; 400];
    let stats = run_controller(&mut controller, &kinds, 41);
    let deviation = stats.mean_joules(200) / 6.0 - 1.0;
    assert!(deviation.abs() <= 0.05, "{deviation:+.4}");
    assert!(
        stats.states[200..]
            .iter()
            .all(|s| *s == BudgetState::Tracking)
    );
}

#[tokio::test]
async fn best_of_n_with_a_verifier_turns_joules_into_accuracy() -> Result<(), super::TtcError> {
    use crate::verifier::VerifierSpec;
    // Each sample is right 62% of the time (single-digit addition on SmolLM2); the verifier
    // recognises a right answer (a tool-checkable one).
    let right_rate = 0.62;
    let mut controller = TtcController::new(
        TtcPolicy {
            strategy: super::TtcStrategy::BestOfN,
            verifier: Some(VerifierSpec::Regex("^right$".into())),
            ..policy(8)
        },
        TtcOptions::default(),
    )?;
    let Some(verifier) = controller.verifier() else {
        panic!("the policy has a verifier")
    };
    let mut rng = SplitMix64::new(51);
    let (mut correct, mut joules_sum, requests) = (0, 0.0, 400);
    for _ in 0..requests {
        let mut session = controller.plan(&features(QueryKind::Easy));
        let mut n = session.first_window();
        let mut tokens = 0;
        loop {
            for _ in 0..n {
                let t = sample_tokens(&mut rng);
                tokens += t;
                let text = if rng.unit() < right_rate {
                    "right"
                } else {
                    "wrong-1"
                };
                let i = session.add_sample(text, -0.5 * t as f64, t, None);
                session.add_verdict(i, verifier.verify("q", text).await);
            }
            match session.decide() {
                WindowDecision::Continue { samples } => n = samples,
                WindowDecision::Stop { .. } => break,
            }
        }
        let outcome = session.finish(MeasuredEnergy {
            joules: joules(tokens, &mut rng),
            prompt_tokens: PROMPT_TOKENS,
            completion_tokens: tokens,
        });
        correct += usize::from(outcome.answer.as_deref() == Some("right"));
        joules_sum += outcome.joules;
        controller.record(&outcome);
    }
    let greedy = run_uniform(&vec![QueryKind::Easy; requests], 1, 52);
    let accuracy = correct as f64 / requests as f64;
    let ratio = joules_sum / requests as f64 / greedy.mean_joules(usize::MAX);
    eprintln!("best-of-N: accuracy {accuracy:.3} at {ratio:.2}x the joules of one sample");
    assert!(accuracy >= 0.95, "{accuracy}");
    assert!(ratio <= 3.0, "{ratio}");
    Ok(())
}

#[test]
fn early_stopping_keeps_fixed_8_accuracy_for_a_fraction_of_its_joules()
-> Result<(), super::TtcError> {
    let kinds = mixed_workload(1500, 61);
    let fixed = run_uniform(&kinds, 8, 62);
    for agreement in [0.75, 1.0] {
        // No allocation and no depth learning: the stopping rule alone decides.
        let mut controller = TtcController::new(
            TtcPolicy {
                early_stop_agreement: agreement,
                difficulty_aware: false,
                ..policy(8)
            },
            TtcOptions::default(),
        )?;
        let early = run_controller(&mut controller, &kinds, 62);
        let ratio = early.mean_joules(usize::MAX) / fixed.mean_joules(usize::MAX);
        eprintln!(
            "early stop at {agreement}: accuracy {:.3} vs fixed-8 {:.3}, {:.2} samples, {:.0}% of the joules",
            early.accuracy(),
            fixed.accuracy(),
            early.mean_samples(usize::MAX),
            100.0 * ratio
        );
        assert!(ratio <= 0.55, "{ratio}");
        assert!(early.accuracy() >= fixed.accuracy() - 0.02);
    }
    Ok(())
}

/// Where samples say how likely they are, a greedy answer the model is sure of settles the vote
/// alone: easy and systematic queries stop at one sample, noisy ones vote on. (The scripted
/// meter's fixed 1.8 J per request keeps one sample at a quarter of fixed-8's joules.)
#[test]
fn the_confident_stop_settles_sure_answers_on_one_sample_at_fixed_8_accuracy()
-> Result<(), super::TtcError> {
    let kinds = mixed_workload(1500, 71);
    let fixed = run_uniform(&kinds, 8, 72);
    let policy = TtcPolicy {
        difficulty_aware: false,
        ..policy(8)
    };
    let script = |priced| Script {
        feedback: false,
        priced,
    };
    let mut agreeing = TtcController::new(policy.clone(), TtcOptions::default())?;
    let agreement = run_script(&mut agreeing, &kinds, 72, script(false));
    let mut confident = TtcController::new(policy, TtcOptions::default())?;
    let stats = run_script(&mut confident, &kinds, 72, script(true));
    let share = |run: &RunStats| run.mean_joules(usize::MAX) / fixed.mean_joules(usize::MAX);
    let samples_of = |wanted: QueryKind| {
        let (sum, n) = kinds
            .iter()
            .zip(&stats.samples)
            .filter(|(kind, _)| **kind == wanted)
            .fold((0, 0), |(sum, n), (_, samples)| (sum + samples, n + 1));
        sum as f64 / f64::from(n)
    };
    eprintln!(
        "fixed-8 {:.3}; agreement alone {:.3} at {:.0}% of its joules; with the confident stop {:.3} at {:.0}% (samples: easy {:.2}, systematic {:.2}, noisy {:.2})",
        fixed.accuracy(),
        agreement.accuracy(),
        100.0 * share(&agreement),
        stats.accuracy(),
        100.0 * share(&stats),
        samples_of(QueryKind::Easy),
        samples_of(QueryKind::Systematic),
        samples_of(QueryKind::Noisy),
    );
    assert!(stats.accuracy() >= fixed.accuracy() - 0.02);
    assert!(samples_of(QueryKind::Easy) < 1.1);
    assert!(samples_of(QueryKind::Systematic) < 1.1);
    assert!(samples_of(QueryKind::Noisy) > 4.0, "noisy queries vote on");
    assert!(
        share(&stats) <= share(&agreement) - 0.05,
        "{} vs {}",
        share(&stats),
        share(&agreement)
    );
    Ok(())
}
