/* A small pthread pool: n_threads - 1 workers sleep on a condition variable; run() publishes a job, every
 * thread (the caller too) claims task indices from an atomic counter, and run() returns when all workers have
 * finished the job. No OpenMP. On platforms without pthreads the pool runs tasks on the caller's thread. */
#include <stdlib.h>

#include "internal.h"

#if defined(_WIN32)

struct mve_pool {
    int n_threads;
};

mve_pool *mve_pool_create(int n_threads) {
    (void)n_threads;
    mve_pool *p = (mve_pool *)calloc(1, sizeof *p);
    if (p) p->n_threads = 1;
    return p;
}
void mve_pool_destroy(mve_pool *pool) { free(pool); }
int mve_pool_threads(const mve_pool *pool) { return pool ? pool->n_threads : 1; }
void mve_pool_run(mve_pool *pool, int n_tasks, void (*fn)(void *, int), void *ctx) {
    (void)pool;
    for (int t = 0; t < n_tasks; t++) fn(ctx, t);
}

#else

#include <pthread.h>
#include <stdatomic.h>

struct mve_pool {
    int n_threads; /* including the caller */
    pthread_t *workers;
    pthread_mutex_t mu;
    pthread_cond_t start, done;
    unsigned long generation; /* bumped once per job */
    int stop;
    int busy; /* workers that have not finished the current job */
    /* the current job */
    void (*fn)(void *ctx, int task);
    void *ctx;
    int n_tasks;
    atomic_int next;
};

static void work(mve_pool *p) {
    for (;;) {
        int t = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        if (t >= p->n_tasks) return;
        p->fn(p->ctx, t);
    }
}

static void *worker_main(void *arg) {
    mve_pool *p = (mve_pool *)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->generation == seen && !p->stop) pthread_cond_wait(&p->start, &p->mu);
        if (p->stop) break;
        seen = p->generation;
        pthread_mutex_unlock(&p->mu);
        work(p);
        pthread_mutex_lock(&p->mu);
        if (--p->busy == 0) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

mve_pool *mve_pool_create(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    if (n_threads > MVE_MAX_THREADS) n_threads = MVE_MAX_THREADS;
    mve_pool *p = (mve_pool *)calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n_threads = 1;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->start, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->next, 0);
    if (n_threads > 1) {
        p->workers = (pthread_t *)calloc((size_t)n_threads - 1, sizeof(pthread_t));
        if (!p->workers) {
            mve_pool_destroy(p);
            return NULL;
        }
        for (int i = 0; i < n_threads - 1; i++) {
            if (pthread_create(&p->workers[i], NULL, worker_main, p) != 0) break; /* run with what started */
            p->n_threads++;
        }
    }
    return p;
}

void mve_pool_destroy(mve_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_threads - 1; i++) pthread_join(p->workers[i], NULL);
    pthread_cond_destroy(&p->start);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->mu);
    free(p->workers);
    free(p);
}

int mve_pool_threads(const mve_pool *p) { return p ? p->n_threads : 1; }

void mve_pool_run(mve_pool *p, int n_tasks, void (*fn)(void *ctx, int task), void *ctx) {
    if (!p || p->n_threads == 1 || n_tasks <= 1) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store_explicit(&p->next, 0, memory_order_relaxed);
    p->busy = p->n_threads - 1;
    p->generation++;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    work(p);
    pthread_mutex_lock(&p->mu);
    while (p->busy > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

#endif
