//! Attribution: every microjoule the sensor counts lands in exactly one request, idle or
//! unattributed, also with overlapping batches and abandoned ones.

use std::sync::{Arc, Mutex};

use ttc_energy::{
    DeviceReading, EnergyError, EnergyMeter, EnergySensor, EnergySource, EstimateModel, HwType,
    SensorReading,
};

/// A sensor whose counter the test moves by hand.
struct HandCounter(Arc<Mutex<u64>>);

impl EnergySensor for HandCounter {
    fn source(&self) -> EnergySource {
        EnergySource::Rapl
    }
    fn read(&mut self) -> Result<SensorReading, EnergyError> {
        let uj = *self.0.lock().unwrap();
        Ok(SensorReading {
            total_uj: uj,
            devices: vec![DeviceReading {
                id: "package-0".into(),
                hw_type: HwType::Cpu,
                energy_uj: uj,
                power_w: None,
            }],
        })
    }
}

fn hand_meter() -> (Arc<Mutex<u64>>, EnergyMeter) {
    let counter = Arc::new(Mutex::new(1_000));
    let meter = EnergyMeter::with_sensor(
        Box::new(HandCounter(counter.clone())),
        EstimateModel::default(),
    )
    .unwrap();
    (counter, meter)
}

fn add(counter: &Mutex<u64>, uj: u64) {
    *counter.lock().unwrap() += uj;
}

#[test]
fn overlapping_batches_share_the_overlap() {
    let (counter, meter) = hand_meter();
    add(&counter, 10); // idle
    let a = meter.begin_batch();
    add(&counter, 100); // A alone
    let b = meter.begin_batch();
    add(&counter, 60); // A and B: 30 each
    let a = a.finish(&[("a1", 1), ("a2", 2)]);
    add(&counter, 7); // B alone
    let b = b.finish(&[("b1", 0)]);
    add(&counter, 3); // idle
    assert_eq!(a.energy_uj, 130);
    assert_eq!(a.requests[0].energy_uj + a.requests[1].energy_uj, 130);
    assert_eq!(b.energy_uj, 37);
    assert_eq!(
        b.requests[0].energy_uj, 37,
        "a lone request takes the batch, tokens or not"
    );
    let t = meter.totals();
    assert_eq!(t.metered_uj, 180);
    assert_eq!(t.idle_uj, 13);
    assert_eq!(t.requests_uj, 167);
    assert_eq!(t.source, EnergySource::Rapl);
}

#[test]
fn abandoned_and_empty_batches_are_unattributed() {
    let (counter, meter) = hand_meter();
    let dropped = meter.begin_batch();
    add(&counter, 50);
    drop(dropped);
    let empty = meter.begin_batch();
    add(&counter, 5);
    let empty = empty.finish::<&str>(&[]);
    assert_eq!(empty.energy_uj, 5);
    let t = meter.totals();
    assert_eq!(t.unattributed_uj, 55);
    assert_eq!(t.requests_uj + t.idle_uj, 0);
}

#[test]
fn per_request_figures_add_up_to_the_meter_over_many_batches() {
    let (counter, meter) = hand_meter();
    let mut per_request = 0u64;
    let mut state = 12345u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    for i in 0..500u64 {
        add(&counter, next() % 1_000);
        let guard = meter.begin_batch();
        add(&counter, next() % 100_000);
        let requests: Vec<(u64, u64)> = (0..1 + next() % 8)
            .map(|r| (i * 10 + r, next() % 300))
            .collect();
        let batch = guard.finish(&requests);
        assert_eq!(
            batch.requests.iter().map(|r| r.energy_uj).sum::<u64>(),
            batch.energy_uj
        );
        per_request += batch.energy_uj;
    }
    add(&counter, 999);
    let t = meter.totals();
    assert_eq!(t.requests_uj, per_request);
    assert_eq!(per_request + t.idle_uj, t.metered_uj);
    assert_eq!(t.metered_uj, *counter.lock().unwrap() - 1_000);
}

#[test]
fn meter_is_shared_across_threads() {
    let (counter, meter) = hand_meter();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let meter = meter.clone();
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut sum = 0;
                for i in 0..200 {
                    let guard = meter.begin_batch();
                    add(&counter, 11);
                    sum += guard.finish(&[((t, i), 1)]).energy_uj;
                }
                sum
            })
        })
        .collect();
    let attributed: u64 = threads.into_iter().map(|h| h.join().unwrap()).sum();
    let t = meter.totals();
    assert_eq!(attributed, t.requests_uj);
    assert_eq!(t.requests_uj + t.idle_uj, t.metered_uj);
    assert_eq!(t.metered_uj, 4 * 200 * 11);
}
