//! Hand-computed cases for the triplet loss masking and Recall@K.

use densebert4ret_trainer::loss::{negative_mask, triplet_loss, Mining};
use densebert4ret_trainer::metrics::{best_relevant_ranks, recall_at, RankingInput, Recalls};
use tch::{Kind, Tensor};

fn matrix(rows: &[&[f32]]) -> Tensor {
    let width = rows[0].len() as i64;
    let values: Vec<f32> = rows.iter().flat_map(|row| row.iter().copied()).collect();
    Tensor::from_slice(&values).view([rows.len() as i64, width])
}

fn loss_value(
    anchors: &Tensor,
    positives: &Tensor,
    targets: &[i64],
    margin: f64,
    mining: Mining,
) -> f64 {
    triplet_loss(
        anchors,
        positives,
        &Tensor::from_slice(targets),
        margin,
        mining,
    )
    .double_value(&[])
}

fn assert_close(actual: f64, expected: f64, label: &str) {
    assert!(
        (actual - expected).abs() < 1e-6,
        "{label}: {actual}, expected {expected}"
    );
}

#[test]
fn negative_mask_excludes_shared_targets() {
    let mask = negative_mask(&Tensor::from_slice(&[4i64, 4, 9]));
    let rows: Vec<Vec<bool>> = (0..3)
        .map(|row| Vec::<bool>::try_from(mask.get(row)).unwrap())
        .collect();
    assert_eq!(rows[0], [false, false, true]);
    assert_eq!(rows[1], [false, false, true]);
    assert_eq!(rows[2], [true, true, false]);
}

#[test]
fn same_target_negatives_are_masked() {
    // Two rows asking for the same target: each positive also satisfies the other
    // anchor, so no negative remains and the loss is zero for every mining.
    let anchors = matrix(&[&[1.0, 0.0], &[1.0, 0.0]]);
    let positives = matrix(&[&[1.0, 0.0], &[1.0, 0.0]]);
    for mining in [Mining::All, Mining::Hardest, Mining::SemiHard] {
        assert_close(
            loss_value(&anchors, &positives, &[5, 5], 0.2, mining),
            0.0,
            mining.as_str(),
        );
    }
    // With different targets the same embeddings violate the margin by exactly 0.2.
    for mining in [Mining::All, Mining::Hardest, Mining::SemiHard] {
        assert_close(
            loss_value(&anchors, &positives, &[5, 6], 0.2, mining),
            0.2,
            mining.as_str(),
        );
    }
}

#[test]
fn masking_drops_pairs_from_the_mean() {
    // Similarities a_i . p_j:
    //   a0: [1.0, 0.0, 0.6]   a1: [0.0, 1.0, 0.8]   a2: [1.0, 0.0, 0.6]
    // Rows 0 and 2 share target 0, so pairs (0, 2) and (2, 0) are masked.
    // With margin 0.5 the valid hinges are (0,1) 0, (1,0) 0, (1,2) 0.3, (2,1) 0.
    let anchors = matrix(&[&[1.0, 0.0], &[0.0, 1.0], &[1.0, 0.0]]);
    let positives = matrix(&[&[1.0, 0.0], &[0.0, 1.0], &[0.6, 0.8]]);
    let targets = [0, 1, 0];
    assert_close(
        loss_value(&anchors, &positives, &targets, 0.5, Mining::All),
        0.3 / 4.0,
        "all",
    );
    assert_close(
        loss_value(&anchors, &positives, &targets, 0.5, Mining::Hardest),
        0.3 / 3.0,
        "hardest",
    );

    // Unmasked, (2, 0) alone would add 0.5 - 0.6 + 1.0 = 0.9.
    let unmasked = loss_value(&anchors, &positives, &[0, 1, 2], 0.5, Mining::All);
    assert_close(
        unmasked,
        (0.3 + 0.9 + 0.1) / 6.0,
        "all without shared targets",
    );
}

#[test]
fn mining_strategies_pick_expected_negatives() {
    // Similarities a_i . p_j with distinct targets and margin 0.5:
    //   a0: [0.6, 1.0, 0.0]  positive 0.6
    //   a1: [0.8, 0.0, 1.0]  positive 0.0
    //   a2: [0.8, 0.0, 1.0]  positive 1.0
    // hardest:   a0 -> 1.0 (0.9), a1 -> 1.0 (1.5), a2 -> 0.8 (0.3); mean 0.9
    // semi-hard: a0 -> 0.0 (0.0), a1 has none below 0.0 so its least similar 0.8 (1.3),
    //            a2 -> 0.8 (0.3); mean 1.6 / 3
    // all:       0.9 + 0 + 1.3 + 1.5 + 0.3 + 0 over 6 pairs
    let anchors = matrix(&[&[1.0, 0.0], &[0.0, 1.0], &[0.0, 1.0]]);
    let positives = matrix(&[&[0.6, 0.8], &[1.0, 0.0], &[0.0, 1.0]]);
    let targets = [0, 1, 2];
    assert_close(
        loss_value(&anchors, &positives, &targets, 0.5, Mining::Hardest),
        0.9,
        "hardest",
    );
    assert_close(
        loss_value(&anchors, &positives, &targets, 0.5, Mining::SemiHard),
        1.6 / 3.0,
        "semi-hard",
    );
    assert_close(
        loss_value(&anchors, &positives, &targets, 0.5, Mining::All),
        4.0 / 6.0,
        "all",
    );
}

#[test]
fn masked_loss_has_finite_gradients() {
    let mut anchors = matrix(&[&[1.0, 0.0], &[0.0, 1.0], &[1.0, 0.0]]).set_requires_grad(true);
    let mut positives = matrix(&[&[1.0, 0.0], &[0.0, 1.0], &[0.6, 0.8]]).set_requires_grad(true);
    for mining in [Mining::All, Mining::Hardest, Mining::SemiHard] {
        anchors.zero_grad();
        positives.zero_grad();
        let loss = triplet_loss(
            &anchors,
            &positives,
            &Tensor::from_slice(&[0i64, 1, 0]),
            0.5,
            mining,
        );
        loss.backward();
        let gradient = anchors.grad();
        assert!(
            gradient.isfinite().all().int64_value(&[]) == 1,
            "{mining}: non-finite anchor gradient"
        );
        // Only anchor 1 violates the margin (against positive 2), so only it gets a gradient.
        assert!(
            gradient.get(1).abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{mining}: anchor 1 has no gradient"
        );
        assert_eq!(
            gradient.get(0).abs().sum(Kind::Float).double_value(&[]),
            0.0,
            "{mining}: anchor 0 moved"
        );
    }
}

#[test]
fn all_masked_batch_still_backpropagates() {
    let anchors = matrix(&[&[1.0, 0.0], &[0.0, 1.0]]).set_requires_grad(true);
    let positives = matrix(&[&[1.0, 0.0], &[0.0, 1.0]]);
    let loss = triplet_loss(
        &anchors,
        &positives,
        &Tensor::from_slice(&[3i64, 3]),
        0.2,
        Mining::Hardest,
    );
    loss.backward();
    assert_eq!(loss.double_value(&[]), 0.0);
    assert_eq!(anchors.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
}

/// One-hot catalog rows, so each query row is directly its score vector.
fn ranks_for(
    scores: &[&[f32]],
    targets: &[i64],
    codes: &[i64],
    excluded: &[Option<usize>],
) -> Vec<usize> {
    let queries = matrix(scores);
    let catalog = Tensor::eye(codes.len() as i64, (Kind::Float, tch::Device::Cpu));
    best_relevant_ranks(&RankingInput {
        queries: &queries,
        catalog: &catalog,
        query_targets: targets,
        catalog_codes: codes,
        excluded,
    })
    .unwrap()
}

#[test]
fn ranks_exclude_reference_and_count_ties() {
    let codes = [1, 3, 7, 7];
    let scores: [&[f32]; 4] = [
        // Target 7: relevant items 2 (0.5) and 3; reference 0 (0.9) is excluded, item 1 (0.8) outranks.
        &[0.9, 0.8, 0.5, 0.1],
        // Target 1: relevant item 0 ties with non-relevant item 2, and ties count against the query.
        &[0.7, 0.3, 0.7, 0.0],
        // Target 3: item 1 is the top score.
        &[0.1, 0.9, 0.2, 0.3],
        // Target 42: nothing in the catalog is relevant.
        &[0.4, 0.3, 0.2, 0.1],
    ];
    let targets = [7, 1, 3, 42];
    let ranks = ranks_for(&scores, &targets, &codes, &[Some(0), None, Some(3), None]);
    assert_eq!(ranks, [1, 1, 0, usize::MAX]);

    assert_eq!(recall_at(&ranks, 1), 0.25);
    assert_eq!(recall_at(&ranks, 2), 0.75);
    assert_eq!(recall_at(&ranks, 50), 0.75);
}

#[test]
fn ranks_without_exclusion_count_reference() {
    let ranks = ranks_for(&[&[0.9, 0.8, 0.5, 0.1]], &[7], &[1, 3, 7, 7], &[None]);
    assert_eq!(ranks, [2]);
}

#[test]
fn excluded_relevant_reference_is_not_a_hit() {
    // The only relevant item is the reference itself, so no relevant item remains.
    let ranks = ranks_for(&[&[0.9, 0.1, 0.0, 0.0]], &[1], &[1, 3, 7, 7], &[Some(0)]);
    assert_eq!(ranks, [usize::MAX]);
}

#[test]
fn recalls_report_every_cutoff() {
    let ranks = [0, 3, 7, 20, 60];
    let recalls = Recalls::from_ranks(&ranks);
    assert_eq!(recalls.at(1), Some(0.2));
    assert_eq!(recalls.at(5), Some(0.4));
    assert_eq!(recalls.at(10), Some(0.6));
    assert_eq!(recalls.at(50), Some(0.8));
    assert_eq!(recalls.at(3), None);
    assert_eq!(recall_at(&[], 10), 0.0);
}

#[test]
fn ranking_rejects_mismatched_lengths() {
    let queries = matrix(&[&[1.0, 0.0]]);
    let catalog = matrix(&[&[1.0, 0.0], &[0.0, 1.0]]);
    let error = best_relevant_ranks(&RankingInput {
        queries: &queries,
        catalog: &catalog,
        query_targets: &[1],
        catalog_codes: &[1],
        excluded: &[None],
    })
    .unwrap_err();
    assert!(
        error.to_string().contains("1 catalog codes for 2 rows"),
        "{error}"
    );

    let error = best_relevant_ranks(&RankingInput {
        queries: &queries,
        catalog: &catalog,
        query_targets: &[1],
        catalog_codes: &[1, 2],
        excluded: &[Some(5)],
    })
    .unwrap_err();
    assert!(error.to_string().contains("reference row 5"), "{error}");
}
